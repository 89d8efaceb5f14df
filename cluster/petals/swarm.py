"""A private Petals swarm on loopback, inside a network namespace that has only ``lo``.

hivemind's p2p daemon probes the local network for port mapping (UPnP / NAT-PMP) and Petals checks PyPI
for updates; in a fresh namespace with only the loopback interface nothing can leave the machine. The
swarm is one DHT bootstrap node plus one Petals server per block range, all started from the Petals
environment (``cluster/petals/build_env.sh``) through ``distattr/models/petals_worker.py``.

    python cluster/petals/swarm.py start --model smollm2-135m --split 0:15,15:30 --dir out/swarm
    python cluster/petals/swarm.py status --dir out/swarm
    python cluster/petals/swarm.py stop --dir out/swarm

``start`` prints the ``petals://`` spec to load the model with (the namespace included, so that the
client worker runs there too) and writes ``<dir>/swarm.json``: namespace, process ids, initial peers,
DHT prefix, logs. ``stop`` ends those processes by their PIDs (each leads a process group that holds its
p2p daemon), then any process left in the namespace, and deletes the namespace. Needs root and iproute2.
Run it with distattr's Python (it writes the servers' model folder with transformers 5).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from distattr.models.petals import WORKER, default_python, export_model_folder, netns_command

STATE = "swarm.json"
DHT_ADDRESS = re.compile(r"Full list of visible multiaddresses: (\S+)")


def parse_split(split: str, n_blocks: int | None = None) -> list[tuple[int, int]]:
    """``"0:15,15:30"`` -> ``[(0, 15), (15, 30)]`` (one server per range; ranges may overlap)."""
    ranges = []
    for part in split.split(","):
        match = re.fullmatch(r"\s*(\d+):(\d+)\s*", part)
        if not match or int(match[1]) >= int(match[2]):
            raise ValueError(f"Bad block range {part!r} in --split {split!r}: write START:END with START < END")
        ranges.append((int(match[1]), int(match[2])))
    if n_blocks is not None:
        covered = {i for a, b in ranges for i in range(a, b)}
        if max(b for _, b in ranges) > n_blocks:
            raise ValueError(f"--split {split!r} goes past the model's {n_blocks} blocks")
        missing = sorted(set(range(n_blocks)) - covered)
        if missing:
            print(f"warning: no server holds blocks {missing}; clients will report missing blocks", file=sys.stderr)
    return ranges


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


def _save(folder: Path, state: dict) -> None:
    (folder / STATE).write_text(json.dumps(state, indent=2))


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _launch(state: dict, folder: Path, name: str, argv: list[str], env: dict) -> subprocess.Popen:
    log = folder / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(netns_command(state["netns"], argv, env), stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    state["pids"][name] = process.pid
    state["logs"][name] = str(log)
    _save(folder, state)
    return process


def _wait_for(process: subprocess.Popen, log: Path, pattern: re.Pattern, what: str, deadline: float) -> re.Match:
    while time.monotonic() < deadline:
        match = pattern.search(log.read_text(errors="replace"))
        if match:
            return match
        if process.poll() is not None:
            raise RuntimeError(f"The {what} exited (code {process.returncode}) before it was ready:\n{_tail(log)}")
        time.sleep(0.5)
    raise TimeoutError(f"The {what} was not ready in time:\n{_tail(log)}")


def start(model: str, split: str, folder: Path, netns: str, dht_prefix: str | None = None, port: int = 31337,
          python: str | None = None, threads: int | None = None, timeout: float = 180.0) -> dict:
    """Start the swarm and return its state (also written to ``folder/swarm.json``)."""
    from transformers import AutoConfig

    python = python or default_python()
    if not Path(python).is_file():
        raise FileNotFoundError(f"No Petals environment at {python}: bash cluster/petals/build_env.sh")
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise PermissionError("A swarm runs in its own network namespace: this needs root and iproute2 (ip)")
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / STATE).exists() and json.loads((folder / STATE).read_text()).get("running"):
        raise RuntimeError(f"{folder / STATE} describes a running swarm; stop it first (swarm.py stop --dir {folder})")
    model_dir = export_model_folder(model, folder / "model")
    n_blocks = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    ranges = parse_split(split, n_blocks)
    prefix = dht_prefix or re.sub(r"[^A-Za-z0-9_-]+", "-", Path(model).name).strip("-")
    state = {"running": True, "netns": netns, "model": model, "model_dir": str(model_dir), "dht_prefix": prefix,
             "split": ranges, "pids": {}, "logs": {}, "initial_peers": [], "python": python}
    _save(folder, state)
    try:
        _run(["ip", "netns", "add", netns])
        state["netns_created"] = True
        _save(folder, state)
        _run(["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"])
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
        deadline = time.monotonic() + timeout
        address = f"/ip4/127.0.0.1/tcp/{port}"
        dht = _launch(state, folder, "dht", [python, str(WORKER), "dht", "--host_maddrs", address,
                                             "--identity_path", str(folder / "dht.id")], env)
        peer = _wait_for(dht, folder / "dht.log", DHT_ADDRESS, "DHT node", deadline)[1]
        state["initial_peers"] = [peer]
        _save(folder, state)
        servers = []
        for i, (a, b) in enumerate(ranges):
            server_address = f"/ip4/127.0.0.1/tcp/{port + 1 + i}"
            servers.append(_launch(state, folder, f"server-{i}", [
                python, str(WORKER), "server", str(model_dir), "--dht_prefix", prefix, "--initial_peers", peer,
                "--block_indices", f"{a}:{b}", "--host_maddrs", server_address, "--announce_maddrs", server_address,
                "--device", "cpu", "--torch_dtype", "float32", "--throughput", "1.0", "--no_auto_relay",
                "--num_handlers", "2"], env))
        for i, process in enumerate(servers):
            _wait_for(process, folder / f"server-{i}.log", re.compile(r"\[INFO\] Started"), f"server {i}", deadline)
    except BaseException:
        stop(folder)
        raise
    state["spec"] = spec_url(state)
    _save(folder, state)
    return state


def spec_url(state: dict) -> str:
    return (f"petals://{state['model']}?initial_peers={','.join(state['initial_peers'])}"
            f"&dht_prefix={state['dht_prefix']}&netns={state['netns']}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop(folder: Path) -> None:
    """End the swarm's processes by PID (their process groups), then anything left in its namespace, and
    delete the namespace."""
    path = folder / STATE
    if not path.exists():
        raise FileNotFoundError(f"No swarm state in {folder}")
    state = json.loads(path.read_text())
    pids = list(state["pids"].values())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            _reap()
            time.sleep(0.2)
        if not any(_alive(p) for p in pids):
            break
    if state.get("netns_created"):
        left = subprocess.run(["ip", "netns", "pids", state["netns"]], capture_output=True, text=True).stdout.split()
        for pid in map(int, left):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "delete", state["netns"]], capture_output=True)
    state["running"] = False
    _save(folder, state)


def _reap() -> None:
    """Collect exited children of this process (when start() launched them) so they do not linger as zombies."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def status(folder: Path) -> dict:
    """The swarm's processes (alive or not) and, from a client, which server holds which blocks."""
    from distattr.models.petals import PetalsClient, legacy_config, parse_spec

    state = json.loads((folder / STATE).read_text())
    report = {"running": state["running"], "spec": state.get("spec"),
              "processes": {name: _alive(pid) for name, pid in state["pids"].items()}}
    if state["running"]:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(state["model_dir"])
        spec = parse_spec(spec_url(state) + f"&timeout=60&python={state['python']}")
        client = PetalsClient(spec, legacy_config(config))
        try:
            report["spans"] = client.info["spans"]
        finally:
            client.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("start", help="start a DHT node and one server per block range")
    run.add_argument("--model", default="smollm2-135m", help="embedded model, .gguf file or local model folder")
    run.add_argument("--split", required=True, help="block ranges, one server each: 0:15,15:30")
    run.add_argument("--netns", default="distattr-petals", help="network namespace to create (default %(default)s)")
    run.add_argument("--dht-prefix", default=None, help="prefix the blocks are announced under (default: model)")
    run.add_argument("--port", type=int, default=31337, help="DHT port; server i listens on port + 1 + i")
    run.add_argument("--python", default=None, help="the Petals environment's python (default: built by build_env.sh)")
    run.add_argument("--threads", type=int, default=None, help="torch threads per server (default: torch's)")
    run.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for every server")
    for name, text in (("status", "show processes and block spans"), ("stop", "stop every process, delete netns")):
        commands.add_parser(name, help=text)
    for sub in commands.choices.values():
        sub.add_argument("--dir", type=Path, required=True, help="state folder (logs, model folder, swarm.json)")
    args = parser.parse_args(argv)
    if args.command == "start":
        state = start(args.model, args.split, args.dir, args.netns, args.dht_prefix, args.port, args.python,
                      args.threads, args.timeout)
        print(f"initial peers: {' '.join(state['initial_peers'])}")
        print(f"pids: {json.dumps(state['pids'])}")
        print(state["spec"])
    elif args.command == "status":
        print(json.dumps(status(args.dir), indent=2))
    else:
        stop(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
