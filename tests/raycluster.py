"""A Ray head node for the test session, started with ``ray start`` on 127.0.0.1 (job server included)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict:
    """Environment of Ray commands and of drivers started by tests: this venv first on PATH (``ray job submit``
    runs ``python`` from the head's PATH), no usage stats, no auth token (the cluster lives in the test's own
    network namespace, reachable from nowhere else). The tests' folder is on PYTHONPATH, so that its helper modules
    (``plugin_method``) import on every node, as a plugin installed on a cluster's nodes would."""
    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": path}


@dataclass(frozen=True)
class RayHead:
    address: str  # GCS host:port
    dashboard: str  # http://host:port of the job server
    temp_dir: str

    @classmethod
    def start(cls, num_cpus: int = 2) -> RayHead:
        temp_dir = tempfile.mkdtemp(prefix="dray", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
        port, dash = free_port(), free_port()
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--num-cpus={num_cpus}", "--num-gpus=0",
               f"--temp-dir={temp_dir}", "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}"]
        done = subprocess.run(cmd, env=ray_env(), capture_output=True, text=True, timeout=180)
        head = cls(address=f"127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dash}", temp_dir=temp_dir)
        if done.returncode != 0:
            head.stop()
            raise RuntimeError(f"ray start failed:\n{done.stdout}\n{done.stderr}")
        return head

    def pids(self) -> list[int]:
        """Processes of this head (their command lines name its temp dir) and all their descendants (workers and
        agents retitle themselves ``ray::...``)."""
        found, parents = set(), {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if self.temp_dir.encode() in (entry / "cmdline").read_bytes():
                        found.add(int(entry.name))
                    parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        grew = True
        while grew:
            more = {pid for pid, parent in parents.items() if parent in found and pid not in found}
            found |= more
            grew = bool(more)
        return sorted(found)

    def stop(self) -> None:
        """Kill this head's processes only (``ray stop`` would kill every Ray instance of the user)."""
        for pid in self.pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


def actor_pids(name: str = "Attributor") -> list[int]:
    """PIDs of live Ray actor processes of class ``name``: from the connected cluster's state API when this process
    is connected (so that actors of another test session on the same machine are never counted), else every process
    Ray titles ``ray::<Class>``."""
    import ray

    if ray.is_initialized():
        from ray.util.state import list_actors

        alive = list_actors(filters=[("class_name", "=", name), ("state", "=", "ALIVE")], raise_on_missing_output=False)
        return [a.pid for a in alive if a.pid]
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(f"ray::{name}".encode()):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found
