"""Entrypoint of a Ray job that attributes a dataset into a Zarr store, for ``ray job submit --working-dir .``.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m launch.attribute_dataset --model smollm2-135m --method integrated_gradients \
        --data /abs/path/prompts.jsonl --text-field prompt --max-new-tokens 32 --actors 2 \
        --store /abs/path/results.zarr

Inside a job ``RAY_ADDRESS`` points at the cluster, so the actors run on its nodes; the options are those of
``distattr attribute-dataset``. Give ``--store`` (and ``--data``) as an absolute path or an fsspec URL that every
node can reach (``s3://bucket/run.zarr``): the job runs in a temporary copy of the working directory, which Ray
deletes afterwards, so a relative path would land there. On a GPU cluster pass ``--num-gpus`` (see
``cluster/ray/gpu-cluster.yaml``).

Where distattr is installed on the cluster (``cluster/ray/gpu-cluster.yaml``, the image of
``cluster/ray/rayjob.yaml``), the console script does the same without uploading this folder:
``ray job submit -- distattr attribute-dataset ...``.
"""

import sys

from distattr.cli import main

if __name__ == "__main__":
    sys.exit(main(["attribute-dataset", *sys.argv[1:]]))
