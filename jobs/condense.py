"""The condense pipeline as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/condense.py configs/demo.yaml --run-dir /shared/runs/demo

Under `ray job submit` RAY_ADDRESS is set and the job joins that cluster. The run directory
must be on storage every node sees when the cluster has several nodes: a shared disk (NFS) or
an object store (s3://bucket/runs/x, credentials from each node's environment). deploy/ runs
it as plain `python jobs/condense.py`, the config and the run directory taken from the job's
environment variables CONDENSE_CONFIG and CONDENSE_RUN_DIR (its runtime env's env_vars):
`ray job submit` quotes the entrypoint's arguments, so a `$VARIABLE` in them never expands.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# The working dir shipped by `ray job submit` is the repo: make the package importable even
# where condense is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from condense.cli import _find_condense_error, run_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "config", nargs="?", default=os.environ.get("CONDENSE_CONFIG"), help="$CONDENSE_CONFIG"
    )
    parser.add_argument(
        "--run-dir", default=os.environ.get("CONDENSE_RUN_DIR"), help="$CONDENSE_RUN_DIR"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--until")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    if not args.config:
        parser.error("give a config file (or set CONDENSE_CONFIG)")
    try:
        return run_config(args.config, args.set, args.run_dir, args.until, None, args.resume)
    except Exception as exc:
        found = _find_condense_error(exc)
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
