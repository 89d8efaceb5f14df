"""Entrypoint of a Ray job that attributes a dataset into a Zarr store.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m launch.attribute_dataset --model smollm2-135m --method integrated_gradients \
        --data prompts.jsonl --text-field prompt --max-new-tokens 32 --actors 2 --store results.zarr

Inside a job ``RAY_ADDRESS`` points at the cluster, so the actors run on its nodes; the options are those of
``distattr attribute-dataset`` (a relative --store path is relative to the job's working directory, which Ray
deletes afterwards: give an absolute path or an fsspec URL that every node can reach).
"""

import sys

from distattr.cli import main

if __name__ == "__main__":
    sys.exit(main(["attribute-dataset", *sys.argv[1:]]))
