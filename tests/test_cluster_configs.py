"""The shipped Ray cluster configs are valid and do what their comments say: the `ray up` YAML against Ray's own
autoscaler schema, the KubeRay RayJob's structure and image, and every documented entrypoint against distattr's
command line (a console script, flags its parser accepts, GPUs asked for, stores every node can reach)."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

from distattr.cli import UsageError, build_parser

ROOT = Path(__file__).parent.parent
CLUSTER = ROOT / "cluster" / "ray"
# a dataset job's command with its flags: the console script, or the module run from a checkout (prose that only
# names them, "`distattr attribute-dataset ...`", is not a command)
ENTRYPOINT = re.compile(r"(distattr attribute-dataset|python -m launch\.attribute_dataset)(?=\s+--)")
STORE = re.compile(r"--store[= ]+([^\s`'\"),]+)")
URL = re.compile(r"^[a-z][a-z0-9+.-]*://\S+")


def console_scripts() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml: script name -> ``module:function``."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def dataset_args(command: str) -> argparse.Namespace:
    """The options of an attribute-dataset entrypoint (``distattr attribute-dataset ...`` or ``python -m
    launch.attribute_dataset ...``), parsed by distattr's own parser; a flag it does not accept fails the test."""
    words = shlex.split(command)
    if words[:2] == ["distattr", "attribute-dataset"]:
        rest = words[2:]
    elif words[:3] == ["python", "-m", "launch.attribute_dataset"]:
        rest = words[3:]
    else:
        raise AssertionError(f"not an attribute-dataset entrypoint: {command!r}")
    try:
        return build_parser().parse_args(["attribute-dataset", *rest])
    except (UsageError, SystemExit):
        pytest.fail(f"distattr attribute-dataset rejects the documented command {command!r}")


def documented_commands(text: str) -> list[str]:
    """The attribute-dataset commands written in ``text`` (YAML comments, Markdown code, docstrings): lines joined
    at a trailing backslash, comment markers and trailing ``# ...`` comments removed, from the entrypoint on."""
    lines = [re.sub(r"^\s*#\s?", "", line).rstrip() for line in text.splitlines()]
    joined, current = [], ""
    for line in lines:
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    commands = []
    for line in joined:
        match = ENTRYPOINT.search(line)
        if match:
            commands.append(re.split(r"\s+#\s", line[match.start():])[0].strip())
    return commands


def is_reachable_store(value: str) -> bool:
    """An absolute path or a URL: not relative to a job's working directory (a temporary copy Ray deletes)."""
    return bool(URL.match(value)) or PurePosixPath(value).is_absolute()


def test_store_check_rejects_relative_paths():
    assert is_reachable_store("s3://bucket/run.zarr") and is_reachable_store("/abs/path/results.zarr")
    assert is_reachable_store("gs://b/r.zarr")
    for relative in ("results.zarr", "./out/results.zarr", "~/results.zarr", "../r.zarr", "s3:/bucket"):
        assert not is_reachable_store(relative), relative


def test_documented_commands_are_found_and_parsed():
    text = """
    #   ray job submit -- distattr attribute-dataset \\
    #       --model m --data /d.jsonl --text-field prompt --num-gpus 1 --store s3://b/r.zarr  # comment
    python -m launch.attribute_dataset --model m --data /d.jsonl --store rel.zarr
    """
    first, second = documented_commands(text)
    assert first.endswith("--store s3://b/r.zarr") and second.startswith("python -m launch")
    assert dataset_args(first).num_gpus == 1 and dataset_args(second).num_gpus is None
    with pytest.raises(pytest.fail.Exception, match="rejects"):
        dataset_args("distattr attribute-dataset --model m --data /d.jsonl --store /r.zarr --no-such-flag")


def test_ray_up_config_matches_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "gpu-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert all(t["resources"].get("GPU", 0) >= 1 for t in workers)
    assert config["available_node_types"][config["head_node_type"]]["resources"]["CPU"] == 0


def test_ray_up_dashboard_listens_on_loopback_only():
    config = yaml.safe_load((CLUSTER / "gpu-cluster.yaml").read_text())
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    hosts = re.findall(r"--dashboard-host[= ](\S+)", starts)
    assert hosts == ["127.0.0.1"], hosts
    assert "0.0.0.0" not in starts


def test_ray_up_entrypoints_ask_for_gpus():
    """The workers start at zero: without --num-gpus the driver would put every actor on the CPU."""
    config = yaml.safe_load((CLUSTER / "gpu-cluster.yaml").read_text())
    assert all(t.get("min_workers", 0) == 0 for name, t in config["available_node_types"].items()
               if name != config["head_node_type"])  # the reason --num-gpus is needed; update the docs if not
    documented = {
        "gpu-cluster.yaml": documented_commands((CLUSTER / "gpu-cluster.yaml").read_text()),
        "cluster/README.md": documented_commands((ROOT / "cluster" / "README.md").read_text()),
    }
    for where, commands in documented.items():
        assert commands, f"no attribute-dataset command documented in {where}"
        for command in commands:
            args = dataset_args(command)
            assert args.num_gpus is not None and args.num_gpus >= 1, f"{where}: {command}"


def test_rayjob_manifest():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    args = dataset_args(spec["entrypoint"])
    assert args.store.startswith("s3://") and args.num_gpus == 1 and args.actors >= 1
    assert PurePosixPath(args.data).is_absolute()
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert all(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for g in workers)
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayjob_entrypoint_is_a_console_script_of_the_package():
    """The image has the installed package, not the checkout: the entrypoint must be a console script that
    pyproject.toml declares, whose function exists and whose parser accepts every flag."""
    spec = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())["spec"]
    words = shlex.split(spec["entrypoint"])
    scripts = console_scripts()
    assert words[0] in scripts, f"{words[0]!r} is not in [project.scripts] {sorted(scripts)}"
    module, _, function = scripts[words[0]].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    assert words[1] == "attribute-dataset"
    dataset_args(spec["entrypoint"])


def test_rayjob_image_is_the_dockerfiles():
    """The image both groups run is the one cluster/ray/Dockerfile builds (its documented tag), from a Ray image of
    the manifest's rayVersion, with distattr and its dist extra installed; the runtime env installs nothing that
    could replace it."""
    spec = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())["spec"]
    cluster = spec["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, images
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"-t {images.pop()} " in dockerfile  # the build command in the Dockerfile's header
    base = re.search(r"^FROM rayproject/ray:(\S+?)-py\d+-gpu$", dockerfile, re.M)
    assert base and base[1] == cluster["rayVersion"]
    install = re.search(r'pip install [^\n]*"/home/ray/distattr\[([^\]]+)\]"', dockerfile)
    assert install and "dist" in install[1].split(","), "the image must install distattr[dist]"
    assert "s3fs" in dockerfile and args_store_scheme(spec["entrypoint"]) == "s3"
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
    assert not set(runtime_env) & {"pip", "uv", "conda", "working_dir", "py_modules"}, runtime_env


def args_store_scheme(entrypoint: str) -> str:
    store = dataset_args(entrypoint).store
    return store.split("://")[0] if URL.match(store) else ""


def test_rayjob_dashboard_stays_inside_the_cluster():
    """KubeRay's submitter and operator reach the job API through the head Service, so the dashboard listens on
    the pod's address; then the Service must be ClusterIP and token authentication on."""
    cluster = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    host = head["rayStartParams"].get("dashboard-host", "0.0.0.0")  # KubeRay's default is 0.0.0.0
    if host != "127.0.0.1":
        assert head.get("serviceType") == "ClusterIP"
        assert cluster.get("authOptions", {}).get("mode") == "token"
        assert tuple(map(int, cluster["rayVersion"].split(".")[:2])) >= (2, 52)  # token authentication


def test_every_documented_store_is_absolute():
    """Every --store in cluster/ and launch/ files is an absolute path or a URL: a job runs in a temporary copy of
    its working directory, so a relative store would be deleted with it."""
    files = [p for folder in ("cluster", "launch") for p in sorted((ROOT / folder).rglob("*"))
             if p.is_file() and p.suffix in {".yaml", ".yml", ".md", ".py", ".sh", ""}]
    found = {}
    for path in files:
        for value in STORE.findall(path.read_text()):
            found.setdefault(str(path.relative_to(ROOT)), []).append(value)
    assert {"cluster/ray/gpu-cluster.yaml", "cluster/ray/rayjob.yaml", "cluster/README.md",
            "launch/attribute_dataset.py"} <= set(found), found
    bad = {where: [v for v in values if not is_reachable_store(v)] for where, values in found.items()}
    assert not any(bad.values()), bad


def test_launch_module_example_parses():
    from launch import attribute_dataset

    (command,) = documented_commands(attribute_dataset.__doc__)
    args = dataset_args(command)
    assert is_reachable_store(args.store) and PurePosixPath(args.data).is_absolute()
