"""The shipped Ray cluster configs are valid: the `ray up` YAML against Ray's own autoscaler schema, the KubeRay
RayJob's structure, and every entrypoint against distattr's command line."""

import json
import shlex
from pathlib import Path

import yaml

from distattr.cli import build_parser

CLUSTER = Path(__file__).parent.parent / "cluster" / "ray"


def parse_entrypoint(command: str):
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "launch.attribute_dataset"], words[:3]
    return build_parser().parse_args(["attribute-dataset", *words[3:]])


def test_ray_up_config_matches_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "gpu-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert all(t["resources"].get("GPU", 0) >= 1 for t in workers)
    assert config["available_node_types"][config["head_node_type"]]["resources"]["CPU"] == 0


def test_rayjob_manifest():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    args = parse_entrypoint(spec["entrypoint"])
    assert args.store.startswith("s3://") and args.num_gpus == 1 and args.actors >= 1
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert all(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for g in workers)
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
