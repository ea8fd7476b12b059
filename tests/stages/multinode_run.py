"""Helper for test_multinode: run the pipeline on a two-node `ray.cluster_utils.Cluster`.

Run in its own process (a Cluster cannot share a process with the suite's local Ray):
    python tests/stages/multinode_run.py INPUT_DIR RUN_DIR
"""

import sys

import ray
from ray.cluster_utils import Cluster

from condense.config import config_from_dict
from condense.pipeline.runner import run_pipeline


def main(input_dir: str, run_dir: str) -> None:
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        cfg = config_from_dict(
            {
                "input": {"kind": "embeddings", "path": input_dir},
                "embed": {"rows_per_part": 250},
                "cluster": {"k": 6, "sample_size": 1000, "workers": 2},
                "ray": {"progress": False},
            }
        )
        run_pipeline(cfg, run_dir, log=lambda _: None, progress=False)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
