"""A training stage as a Ray job: `condense train` with its workers on the cluster.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py stage1 configs/train/stage1.yaml --run-dir /shared/runs/demo \
        --workers 8

Under `ray job submit` RAY_ADDRESS is set and the TorchTrainer joins that cluster, one GPU per
worker where it has GPUs. The run directory must be on storage every node sees.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The working dir shipped by `ray job submit` is the repo: make the package importable even
# where condense is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from condense.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
