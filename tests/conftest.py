import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore", category=UserWarning, module="captum")

from netns import isolate_network  # noqa: E402

# Everything the tests start (Ray, an S3 server, browsers) lives in a network namespace of its own with only a
# loopback interface: nothing can reach or be reached from the machine's network.
NETWORK_ISOLATED = isolate_network()


@pytest.fixture
def tiny():
    """``tiny(kind, method="saliency", **args)`` -> a distattr AttributionModel on a tiny random model."""
    from tiny import tiny_model

    import distattr

    def make(kind: str = "gpt2", method: str = "saliency", **args):
        model, tok = tiny_model(kind)
        return distattr.load_model(model, method, tokenizer=tok, **args)

    return make


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``tiny_dir(kind)`` -> a folder holding a tiny random model of ``kind`` and its tokenizer, for code that loads
    models by path (the CLI, Ray actors, worker processes); saved once per session."""
    from tiny import tiny_model

    folders: dict[str, str] = {}

    def make(kind: str = "gpt2") -> str:
        if kind not in folders:
            folder = tmp_path_factory.mktemp(f"tiny-{kind}")
            model, tok = tiny_model(kind)
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
            folders[kind] = str(folder)
        return folders[kind]

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are overhead-bound: one intra-op thread is several times faster than two on a busy machine.
    Modules that run many tiny models use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """One Ray head node on 127.0.0.1 for the whole session (with the job server, for ``ray job submit``), and
    this process connected to it. Yields its addresses; stops only its own processes at the end."""
    from raycluster import RayHead, ray_env

    if not NETWORK_ISOLATED:
        pytest.skip("Ray tests run only in an isolated network namespace (needs root on Linux)")
    for key in ("RAY_USAGE_STATS_ENABLED", "RAY_AUTH_MODE"):
        os.environ[key] = ray_env()[key]
    head = RayHead.start()
    try:
        import ray

        ray.init(address=head.address, log_to_driver=False)
        yield head
    finally:
        import ray

        ray.shutdown()
        head.stop()


@pytest.fixture
def s3_server(tmp_path):
    """A moto S3 server on 127.0.0.1 with one bucket (``distattr-test``); yields fsspec storage options."""
    import subprocess
    import time

    from raycluster import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    try:
        import s3fs

        deadline = time.time() + 60
        while True:
            try:
                fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
                fs.call_s3("create_bucket", Bucket="distattr-test")
                break
            except Exception:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.3)
        yield options
    finally:
        server.kill()
        server.wait()


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size)`` -> a folder on a fresh tmpfs of ``size`` (``"1m"``, ``"4m"``) that fills up for real;
    unmounted afterwards. Skips where mounting is not allowed (needs root)."""
    mounted: list[Path] = []

    def make(size: str) -> Path:
        disk = tmp_path / f"disk-{len(mounted)}"
        disk.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(disk)
        return disk

    yield make
    for disk in mounted:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
