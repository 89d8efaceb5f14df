"""The Petals backend (distattr/models/petals.py).

Fast tests run the pipe protocol against a stand-in worker that computes the blocks of a tiny model locally
(tests/petals_fake_worker.py): equality with local attribution, padding, timeouts, refused methods. The slow
tests build the Petals environment, start a real two-server private swarm of the embedded model on loopback
inside a network namespace (cluster/petals/swarm.py), attribute through it, and tear it down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import distattr
from distattr.api import AttributionModel
from distattr.models import petals
from distattr.models.adapters import wrap_model

ROOT = Path(__file__).resolve().parents[1]
FAKE_WORKER = Path(__file__).with_name("petals_fake_worker.py")
PEER = "/ip4/127.0.0.1/tcp/31337/p2p/QmRTsJGQvYWTTH78RNzNCqCjbFSNg3NfHZtpB7C86fwWva"


def assert_same_results(a, b, exact: bool = True, tol: float = 1e-6):
    """Same tokens, attributions and step scores (bit for bit with ``exact``, else within ``tol`` of the largest
    attribution, and ``tol`` relative for step scores)."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.target_ids == y.target_ids
        scale = float(np.nanmax(np.abs(x.target_attributions)))
        if exact:
            np.testing.assert_array_equal(x.target_attributions, y.target_attributions)
        else:
            np.testing.assert_allclose(x.target_attributions, y.target_attributions, rtol=0, atol=tol * scale,
                                       equal_nan=True)
        assert set(x.step_scores) == set(y.step_scores)
        for name in x.step_scores:
            np.testing.assert_allclose(x.step_scores[name], y.step_scores[name], rtol=0 if exact else tol, atol=0)


# ------------------------------------------------------------------------------------------------ specs


def test_parse_spec():
    spec = petals.parse_spec(f"petals://smollm2-135m?initial_peers={PEER},{PEER}&dht_prefix=smol&netns=ns1"
                             "&timeout=30&max_retries=2&python=/opt/p/bin/python")
    assert spec.model == "smollm2-135m" and spec.initial_peers == (PEER, PEER) and spec.dht_prefix == "smol"
    assert (spec.netns, spec.timeout, spec.max_retries, spec.python) == ("ns1", 30.0, 2, "/opt/p/bin/python")
    repeated = petals.parse_spec(f"petals:///models/llama?initial_peers={PEER}&initial_peers={PEER}&dht_prefix=x")
    assert repeated.model == "/models/llama" and len(repeated.initial_peers) == 2 and repeated.netns is None


@pytest.mark.parametrize("url, message", [
    ("petals://m?dht_prefix=x", "initial_peers"),
    (f"petals://m?initial_peers={PEER}", "dht_prefix"),
    (f"petals://?initial_peers={PEER}&dht_prefix=x", "No model"),
    (f"petals://m?initial_peers={PEER}&dht_prefix=x&port=3", "Unknown Petals spec parameter"),
    (f"petals://m?initial_peers={PEER}&dht_prefix=x&timeout=soon", "Bad timeout"),
    (f"petals://m?initial_peers={PEER}&dht_prefix=x&max_retries=0", "max_retries"),
])
def test_bad_specs(url, message):
    with pytest.raises(ValueError, match=message):
        petals.parse_spec(url)


def test_missing_environment_and_internals_are_refused_before_loading(tmp_path):
    spec = f"petals://smollm2-135m?initial_peers={PEER}&dht_prefix=x&python={tmp_path}/nothing/bin/python"
    with pytest.raises(FileNotFoundError, match="build_env.sh"):
        distattr.load_model(spec, "saliency")
    for method, args in (("attention", {}), ("value_zeroing", {}),
                         ("layer_gradient_x_activation", {"target_layer": "model.layers.remote"})):
        with pytest.raises(ValueError, match="remote Petals"):
            distattr.load_model(spec, method, **args)
    with pytest.raises(ValueError, match="do not apply to a petals"):
        distattr.load_model(spec, "saliency", quantization="nf4")


def test_only_llama_architectures(tmp_path):
    from tiny import _config

    _config("gpt2").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Llama-architecture"):
        petals.load_remote(f"petals://{tmp_path}?initial_peers={PEER}&dht_prefix=x", command=["false"])


def test_legacy_config_for_petals_servers():
    from tiny import _config

    config = _config("llama")
    config.rope_parameters = {"rope_type": "default", "rope_theta": 12345.0}
    legacy = petals.legacy_config(config)
    assert legacy["rope_theta"] == 12345.0 and legacy["rope_scaling"] is None
    assert "rope_parameters" not in legacy and legacy["torch_dtype"] == "float32"
    assert legacy["num_hidden_layers"] == 2 and legacy["model_type"] == "llama"


# ------------------------------------------------------------------------------------------------ stand-in worker


@pytest.fixture(scope="module")
def tiny_folder(tiny_dir):
    return tiny_dir("llama")


def fake_remote(folder: str, method: str = "saliency", *worker_args: str, timeout: float = 60) -> AttributionModel:
    url = f"petals://{folder}?initial_peers={PEER}&dht_prefix=tiny&timeout={timeout}"
    loaded = petals.load_remote(url, command=[sys.executable, str(FAKE_WORKER), folder, *worker_args])
    return AttributionModel(loaded=loaded, adapter=wrap_model(loaded.model, prefix_cache=False), method=method)


@pytest.fixture(scope="module")
def tiny_pair(tiny_folder):
    """(local, remote): the tiny Llama in this process, and the same model with its blocks behind the pipe."""
    local = distattr.load_model(tiny_folder, "saliency", model_kwargs={"attn_implementation": "eager"})
    remote = fake_remote(tiny_folder)
    yield local, remote
    remote.model.model.layers.remote.client.close()


@pytest.mark.parametrize("method, args", [
    ("saliency", {}), ("input_x_gradient", {}), ("integrated_gradients", {"n_steps": 5}),
    ("gradient_shap", {"n_samples": 3}), ("sequential_integrated_gradients", {"n_steps": 3}),
    ("discretized_integrated_gradients", {"n_steps": 3, "n_neighbors": 5}), ("deeplift", {}),
    ("layer_gradient_x_activation", {"target_layer": "model.norm"}), ("layer_integrated_gradients", {"n_steps": 3}),
    ("occlusion", {}), ("lime", {"n_samples": 32}), ("reagent", {"num_probes": 4, "max_probe_steps": 4}),
])
def test_remote_blocks_give_local_numbers(tiny_pair, method, args):
    """Prompts of different lengths: left-padded generation goes through the remote blocks in runs of rows that
    start together; attribution rows are right-padded without a mask; step backwards are batched (vmap)."""
    local, remote = tiny_pair
    texts = ["the cat is in the", "a dog"]
    kwargs = {"generation_args": {"max_new_tokens": 4}, "step_scores": ["probability"], "show_progress": False}
    expected = local.attribute(texts, method=method, **kwargs, **args)
    got = remote.attribute(texts, method=method, **kwargs, **args)
    # the local run batches several step backwards with vmap where the remote one loops over them: the same
    # sums in a different order, so equal up to float32 rounding
    assert_same_results(expected, got, exact=False)


def test_recompute_leaves_remote_blocks_alone(tiny_pair):
    """Remote blocks keep no activations here: recompute="always" has nothing to recompute locally and sends each
    span once per forward, with the local numbers."""
    local, remote = tiny_pair
    kwargs = {"generation_args": {"max_new_tokens": 3}, "show_progress": False}
    expected = local.attribute("the cat is in the", recompute="never", **kwargs)
    got = remote.attribute("the cat is in the", expected.info["generated_texts"], recompute="always",
                           **{k: v for k, v in kwargs.items() if k != "generation_args"})
    assert_same_results(expected, got, exact=False)


def test_remote_model_structure_and_refused_methods(tiny_pair):
    _, remote = tiny_pair
    names = [n for n, _ in remote.model.named_modules()]
    assert "model.layers.remote" in names and not any(n.startswith("model.layers.0") for n in names)
    assert remote.loaded.source["kind"] == "petals" and remote.loaded.source["spans"] == [[0, 2, "fake-peer"]]
    for method, args in (("attention", {}), ("value_zeroing", {}),
                         ("layer_integrated_gradients", {"target_layer": "model.layers"})):
        with pytest.raises(ValueError, match="remote Petals"):
            remote.attribute("the cat", method=method, show_progress=False, **args)


def test_padding_checks():
    import torch

    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool).tril()
    mask[1, :, :, :2] = False  # row 1 is left-padded by two tokens
    starts = petals._row_starts(mask, torch.tensor([[0, 1, 2, 3], [1, 1, 0, 1]]), torch.Size([2, 4]))
    assert starts.tolist() == [0, 2]
    assert petals._row_starts(None, torch.arange(4)[None], torch.Size([3, 4])) is None
    with pytest.raises(ValueError, match="position ids"):
        petals._row_starts(None, torch.arange(1, 5)[None], torch.Size([1, 4]))
    holes = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    holes[0, :, :, 1] = False
    with pytest.raises(ValueError, match="causal"):
        petals._row_starts(holes, None, torch.Size([1, 4]))


@pytest.mark.parametrize("hang_after, request_name", [(1, "forward"), (2, "backward")])
def test_a_swarm_that_stops_answering_times_out(tiny_folder, hang_after, request_name):
    """The worker answers `open` (and the forward), then hangs: the request times out, the worker is killed, and
    both errors are PetalsUnavailable (the timeout still a TimeoutError), so a caller can start a new client."""
    remote = fake_remote(tiny_folder, "saliency", "--hang-after", str(hang_after), timeout=2)
    client = remote.model.model.layers.remote.client
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=f"did not answer within 2 s while trying to run a {request_name}") as error:
        remote.attribute("the cat is", generated_texts="the cat is big", show_progress=False)
    assert time.monotonic() - started < 20
    assert isinstance(error.value, petals.PetalsUnavailable) and isinstance(error.value, petals.PetalsTimeout)
    assert client.process.poll() is not None  # the worker was stopped, by PID
    with pytest.raises(petals.PetalsUnavailable, match="stopped earlier: timed out"):
        remote.attribute("the cat is", generated_texts="the cat is big", show_progress=False)


def test_a_worker_killed_mid_session_is_unavailable(tiny_folder):
    """A worker that dies between requests (killed, out of memory): the next request says it exited, the one after
    that the client was stopped; both are PetalsUnavailable and neither is a timeout."""
    remote = fake_remote(tiny_folder, "saliency")
    client = remote.model.model.layers.remote.client
    remote.attribute("the cat is", generated_texts="the cat is big", show_progress=False)  # a working session
    os.killpg(client.pid, signal.SIGKILL)
    client.process.wait(timeout=10)
    with pytest.raises(petals.PetalsUnavailable, match="worker exited while trying to run a forward") as error:
        remote.attribute("the cat is", generated_texts="the cat is big", show_progress=False)
    assert not isinstance(error.value, TimeoutError)
    with pytest.raises(petals.PetalsUnavailable, match="stopped earlier: the worker exited"):
        remote.attribute("the cat is", generated_texts="the cat is big", show_progress=False)


def test_a_closed_client_is_unavailable(tiny_folder):
    remote = fake_remote(tiny_folder, "saliency")
    remote.model.model.layers.remote.client.close()
    with pytest.raises(petals.PetalsUnavailable, match="stopped earlier: closed"):
        remote.attribute("the cat", generated_texts="the cat sat", show_progress=False)


def test_a_swarm_without_the_blocks_is_an_error(tiny_folder):
    with pytest.raises(petals.PetalsUnavailable, match="lacks blocks"):
        fake_remote(tiny_folder, "saliency", "--missing")


def test_a_worker_that_dies_is_an_error(tiny_folder):
    with pytest.raises(petals.PetalsUnavailable, match="worker exited") as error:
        fake_remote(tiny_folder, "saliency", "--no-such-option")
    assert "unrecognized arguments: --no-such-option" in str(error.value)  # the end of the worker's log


def bare_client() -> petals.PetalsClient:
    """A client without a worker, for the mapping of the worker's error replies."""
    client = petals.PetalsClient.__new__(petals.PetalsClient)
    client.spec = petals.parse_spec(f"petals://m?initial_peers={PEER}&dht_prefix=tiny")
    return client


@pytest.mark.parametrize("kind, error, expected, also", [
    ("TimeoutError", "", petals.PetalsTimeout, TimeoutError),
    ("P2PDaemonError", "Daemon failed to start", petals.PetalsUnavailable, RuntimeError),
    ("ConnectionResetError", "reset by peer", petals.PetalsUnavailable, RuntimeError),
    ("MissingBlocksError", "No servers holding blocks [3] are online.", petals.PetalsUnavailable, RuntimeError),
    ("P2PDaemonError", "failed to connect to bootstrap peers", petals.PetalsUnreachable, ConnectionError),
])
def test_worker_errors_that_mean_the_swarm_is_gone_are_unavailable(kind, error, expected, also):
    err = bare_client()._remote_error({"ok": False, "kind": kind, "error": error}, "run a forward")
    assert type(err) is expected and isinstance(err, also) and petals.is_unavailable(err)


@pytest.mark.parametrize("kind", ["ValueError", "AssertionError", "P2PHandlerError", "KeyError"])
def test_other_worker_errors_are_not_unavailable(kind):
    err = bare_client()._remote_error({"ok": False, "kind": kind, "error": "bad input"}, "run a forward")
    assert type(err) is RuntimeError and f"{kind}: bad input" in str(err) and not petals.is_unavailable(err)


def test_is_unavailable_finds_the_error_in_a_chain():
    import pickle

    def chained(original: BaseException, explicit: bool) -> BaseException:
        try:
            try:
                raise original
            except BaseException as err:
                if explicit:
                    raise ValueError("the unit failed") from err
                raise KeyError("while handling it")  # noqa: B904 (an implicit __context__ on purpose)
        except BaseException as outer:
            return outer

    timeout = petals.PetalsTimeout("The Petals swarm did not answer within 2 s")
    assert petals.is_unavailable(timeout) and petals.is_unavailable(chained(timeout, explicit=True))
    assert petals.is_unavailable(chained(chained(timeout, explicit=False), explicit=True))
    assert not petals.is_unavailable(chained(TimeoutError("a plain timeout"), explicit=True))
    assert not petals.is_unavailable(RuntimeError("Petals failed")) and not petals.is_unavailable(None)
    cyclic = ValueError("a")
    cyclic.__context__ = KeyError("b")
    cyclic.__context__.__context__ = cyclic
    assert not petals.is_unavailable(cyclic)
    # Ray sends an actor's exception to the caller pickled, inside a RayTaskError that keeps it as `cause`
    for err in (timeout, petals.PetalsUnreachable("no peers"), petals.PetalsUnavailable("exited")):
        copy = pickle.loads(pickle.dumps(err))
        assert type(copy) is type(err) and str(copy) == str(err) and petals.is_unavailable(copy)
    from ray.exceptions import RayTaskError

    wrapped = RayTaskError("attribute_unit", "Traceback ...", timeout)
    assert petals.is_unavailable(wrapped) and petals.is_unavailable(wrapped.as_instanceof_cause())
    assert not petals.is_unavailable(RayTaskError("attribute_unit", "Traceback ...", ValueError("bad row")))


# ------------------------------------------------------------------------------------------------ real swarm

PROMPT = "The Eiffel Tower is located in the city of"
SWARM = ROOT / "cluster" / "petals" / "swarm.py"


@pytest.fixture(scope="module")
def petals_python():
    """The Petals environment (built by `.ci/install --dev`; built here if missing and PyPI is reachable)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("a Petals swarm runs in its own network namespace: needs root and iproute2")
    result = subprocess.run(["bash", str(ROOT / "cluster" / "petals" / "build_env.sh")], capture_output=True,
                            text=True, env={**os.environ, "PIP_RETRIES": "0", "PIP_DEFAULT_TIMEOUT": "15"})
    if result.returncode != 0:
        pytest.skip(f"cannot build the Petals environment here (bash cluster/petals/build_env.sh needs PyPI): "
                    f"{result.stderr[-800:]}")
    return petals.default_python()


@pytest.fixture(scope="module")
def swarm(petals_python, tmp_path_factory):
    """Two servers (blocks 0:15 and 15:30) of the embedded model plus a DHT node, in a fresh namespace; on
    teardown every process is gone and the namespace deleted."""
    folder = tmp_path_factory.mktemp("swarm")
    netns = f"distattr-test-{os.getpid()}"
    command = [sys.executable, str(SWARM)]
    started = subprocess.run([*command, "start", "--model", "smollm2-135m", "--split", "0:15,15:30", "--dir",
                              str(folder), "--netns", netns, "--dht-prefix", "smollm2-test", "--python", petals_python],
                             capture_output=True, text=True, timeout=300)
    state = json.loads((folder / "swarm.json").read_text()) if (folder / "swarm.json").exists() else {}
    assert started.returncode == 0, f"swarm did not start:\n{started.stdout}\n{started.stderr[-3000:]}"
    assert state["spec"] in started.stdout
    try:
        yield state
    finally:
        subprocess.run([*command, "stop", "--dir", str(folder)], check=True, timeout=120)
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert netns not in namespaces
        for pid in state["pids"].values():
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


@pytest.fixture(scope="module")
def remote_smollm(swarm, petals_python):
    model = distattr.load_model(f"{swarm['spec']}&timeout=60&python={petals_python}", "saliency")
    yield model
    model.model.model.layers.remote.client.close()


@pytest.mark.slow
def test_swarm_attribution_equals_local(remote_smollm, swarm):
    """Saliency and integrated gradients through two servers equal local attribution. The servers run
    transformers 4.34's eager attention on the Petals environment's torch, so the local model runs eager
    attention too. Whether the two torch builds agree to the last bit depends on the CPU's kernels: bit for bit
    on an AMD EPYC, 8.3e-7 of the largest value apart on an Intel Xeon (with SDPA locally: ~1e-6 on both);
    the bound is 1e-5."""
    assert [tuple(s[:2]) for s in remote_smollm.loaded.source["spans"]] == [(0, 15), (15, 30)]
    local = distattr.load_model("smollm2-135m", "saliency", model_kwargs={"attn_implementation": "eager"})
    kwargs = {"generation_args": {"max_new_tokens": 3}, "step_scores": ["probability"], "show_progress": False,
              "token_budget": 64}  # the same row batches on both sides
    for method, args in (("saliency", {}), ("integrated_gradients", {"n_steps": 4})):
        expected = local.attribute(PROMPT, method=method, **kwargs, **args)
        got = remote_smollm.attribute(PROMPT, method=method, **kwargs, **args)
        assert got[0].target_tokens[-3:] == ("ĠParis", ",", "ĠFrance")
        assert_same_results(expected, got, exact=False, tol=1e-5)


@pytest.mark.slow
def test_swarm_refuses_internals(remote_smollm):
    with pytest.raises(ValueError, match="remote Petals"):
        remote_smollm.attribute(PROMPT, method="attention", show_progress=False)


@pytest.mark.slow
def test_swarm_with_a_wrong_prefix_or_peer(swarm, petals_python):
    base = f"petals://smollm2-135m?netns={swarm['netns']}&python={petals_python}&timeout=30&max_retries=1"
    started = time.monotonic()
    with pytest.raises(petals.PetalsUnavailable, match="lacks blocks"):
        distattr.load_model(f"{base}&initial_peers={swarm['initial_peers'][0]}&dht_prefix=nobody", "saliency")
    dead_peer = swarm["initial_peers"][0].replace("/tcp/31337/", "/tcp/31999/")
    with pytest.raises(petals.PetalsUnreachable, match="Could not reach") as error:
        distattr.load_model(f"{base}&initial_peers={dead_peer}&dht_prefix=smollm2-test", "saliency")
    assert isinstance(error.value, ConnectionError) and petals.is_unavailable(error.value)
    assert time.monotonic() - started < 90


@pytest.mark.slow
def test_swarm_server_that_hangs_times_out(swarm, petals_python):
    """A server that stops answering (SIGSTOP) makes the next request time out after `timeout` seconds with a clear
    message, instead of Petals' default of retrying forever."""
    model = distattr.load_model(f"{swarm['spec']}&timeout=8&python={petals_python}", "saliency")
    hung = swarm["pids"]["server-1"]
    os.kill(hung, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="did not answer within 8 s") as error:
            model.attribute(PROMPT, generated_texts=PROMPT + " Paris", show_progress=False)
        assert time.monotonic() - started < 30
        assert isinstance(error.value, petals.PetalsTimeout)
    finally:
        os.kill(hung, signal.SIGCONT)


@pytest.mark.slow
def test_ray_actors_shard_a_dataset_over_petals_clients(swarm, petals_python, ray_head, tmp_path):
    """attribute_dataset with a petals:// model: each of two Ray actors starts its own Petals client (worker
    process in the swarm's namespace) and writes its unit; the values are those of a local model."""
    prompts = ["The Eiffel Tower is located in the city of", "The capital of Italy is"]
    rows = [{"prompt": p, "uid": f"q{i}"} for i, p in enumerate(prompts)]
    spec = f"{swarm['spec']}&timeout=120&python={petals_python}"
    summary = distattr.attribute_dataset(spec, rows, str(tmp_path / "petals.zarr"), "saliency", max_new_tokens=2,
                                         actors=2, unit_size=1, id_field="uid", show_progress=False, token_budget=64)
    assert summary.complete and summary.examples == 2 and summary.units == 2 and not summary.failures
    store = distattr.open_store(str(tmp_path / "petals.zarr"))
    local = distattr.load_model("smollm2-135m", "saliency", model_kwargs={"attn_implementation": "eager"})
    for i, prompt in enumerate(prompts):
        expected = local.attribute(prompt, generation_args={"max_new_tokens": 2}, token_budget=64, show_progress=False)
        # actors run one torch thread, this process two (and here the blocks run locally): float32 rounding differs
        # (measured 1.2e-6 of the largest value); test_swarm_attribution_equals_local checks exact equality
        assert_same_results(expected, store[i], exact=False, tol=1e-5)


def test_a_dataset_actor_rebuilds_a_petals_client_that_dies(swarm, petals_python, ray_head, tmp_path):
    """The Petals client process of the job's only actor is killed after its first unit: the actor starts a new
    client and the job completes with every example (no unit is lost or handed to an actor that cannot serve it)."""
    import threading

    from raycluster import actor_pids

    prompts = ["The Eiffel Tower is located in the city of", "The capital of Italy is", "Paris is the capital of",
               "The Colosseum is in"]
    rows = [{"prompt": p, "uid": f"q{i}"} for i, p in enumerate(prompts)]
    spec = f"{swarm['spec']}&timeout=120&python={petals_python}"
    url, logs = str(tmp_path / "rebuilt.zarr"), tmp_path / "logs"
    result = {}

    def run():
        result["summary"] = distattr.attribute_dataset(spec, rows, url, "saliency", max_new_tokens=2, actors=1,
                                                       unit_size=1, id_field="uid", show_progress=False,
                                                       token_budget=64, log_dir=str(logs))

    job = threading.Thread(target=run)
    job.start()
    killed = []
    deadline = time.time() + 600
    while time.time() < deadline and job.is_alive() and not killed:
        if (Path(url) / "done" / "c").is_dir():
            actors = set(actor_pids())
            for entry in Path("/proc").iterdir():  # the actor's client: a petals_worker.py child of the actor
                try:
                    parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    if parent in actors and b"petals_worker.py" in (entry / "cmdline").read_bytes():
                        os.kill(int(entry.name), signal.SIGKILL)
                        killed.append(int(entry.name))
                except (OSError, ValueError, IndexError):
                    continue
        time.sleep(0.05)
    job.join(timeout=600)
    assert killed, "the job ended before its Petals client could be killed"
    summary = result["summary"]
    assert summary.complete and not summary.failures and not summary.failed_examples
    assert "rebuilding it (1 of 2)" in (logs / "actor-0.log").read_text()
    store = distattr.open_store(url)
    assert [store[i].info["example_id"] for i in range(4)] == ["q0", "q1", "q2", "q3"]
