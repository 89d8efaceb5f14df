"""The side of the Petals backend that runs in the Petals virtualenv (``cluster/petals/build_env.sh``).

Petals 2.2.0.post1 pins transformers 4.3x, so it cannot be imported next to distattr (transformers 5).
This file is therefore run by path with the Petals environment's Python and imports nothing from
distattr; it needs only torch, hivemind and petals. It has four commands:

``client``
    The Petals client of one distattr model. distattr starts it as a child process (inside a network
    namespace when asked) and talks to it over its stdin/stdout pipes; pipes cross network namespaces,
    loopback sockets do not. Each message is an 8-byte big-endian length followed by ``torch.save`` bytes
    of a dict. Requests (``op``): ``open`` (model config, swarm address, timeouts), ``forward`` (hidden
    states ``[B, L, d]`` through every remote block; with ``grad`` the autograd graph is kept under a
    handle), ``backward`` (a handle and ``grad_output [B, L, d]`` -> ``grad_input [B, L, d]``; the graph is
    kept for further backwards), ``close``. Every request may name handles to ``release``. Replies are
    ``{"ok": True, ...}`` or ``{"ok": False, "error": str, "kind": str}``; the client outlives failed
    requests.
``server`` / ``dht``
    ``petals.cli.run_server`` / ``petals.cli.run_dht`` with the given arguments (used by
    ``cluster/petals/swarm.py``).
``identity PATH``
    Create a libp2p identity file at PATH if missing and print its peer id (so a swarm's address is
    known before its DHT starts).

hivemind 1.1.12 (the only Linux wheel that bundles the ``p2pd`` daemon) no longer exports at top level
several names that petals 2.2 imports from ``hivemind``; :func:`shim_hivemind` puts them back from the
submodules where they still live before petals is imported.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import time
import traceback

# Run by path, Python puts this folder first on sys.path, where distattr's own petals.py would shadow the
# petals package.
if sys.path and os.path.realpath(sys.path[0] or ".") == os.path.dirname(os.path.realpath(__file__)):
    del sys.path[0]

# name -> module of hivemind 1.1.12 that still defines it (hivemind PR #663 removed the top-level exports)
_HIVEMIND_NAMES = {
    "P2P": "hivemind.p2p",
    "P2PContext": "hivemind.p2p",
    "PeerID": "hivemind.p2p",
    "PeerInfo": "hivemind.p2p",
    "MAX_DHT_TIME_DISCREPANCY_SECONDS": "hivemind.utils",
    "MSGPackSerializer": "hivemind.utils",
    "TensorDescriptor": "hivemind.utils",
    "BatchTensorDescriptor": "hivemind.utils.tensor_descr",
    "TimedStorage": "hivemind.utils",
    "get_dht_time": "hivemind.utils",
    "get_logger": "hivemind.utils",
    "nested_compare": "hivemind.utils.nested",
    "nested_flatten": "hivemind.utils",
    "nested_pack": "hivemind.utils",
    "anext": "hivemind.utils.asyncio",
    "split_for_streaming": "hivemind.utils.streaming",
    "serialize_torch_tensor": "hivemind.compression",
    "deserialize_torch_tensor": "hivemind.compression",
    "deserialize_tensor_stream": "hivemind.compression",
    "Runtime": "hivemind.moe.server.runtime",
}


def shim_hivemind() -> None:
    """Restore the top-level hivemind names that petals 2.2 imports (no-op on older hivemind)."""
    import importlib

    import hivemind

    for name, module in _HIVEMIND_NAMES.items():
        if not hasattr(hivemind, name):
            setattr(hivemind, name, getattr(importlib.import_module(module), name))


# ------------------------------------------------------------------------------------------------ messages


def read_message(stream) -> dict | None:
    """One length-prefixed ``torch.save`` message, or None at end of stream."""
    import torch

    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack(">Q", header)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return torch.load(io.BytesIO(payload), weights_only=True)


def write_message(stream, message: dict) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(message, buffer)
    payload = buffer.getvalue()
    stream.write(struct.pack(">Q", len(payload)) + payload)
    stream.flush()


# ------------------------------------------------------------------------------------------------ client


class _Client:
    """The remote blocks of one model, and what backwards need of the forwards that will be differentiated."""

    def __init__(self) -> None:
        self.blocks = None
        self.graphs: dict[int, list] = {}  # handle -> [(span inputs, spans) of each sub-batch]
        self.next_handle = 0

    def open(self, request: dict) -> dict:
        import petals  # noqa: F401  (registers the model families)
        from petals.client.remote_sequential import RemoteSequential

        settings = {
            "initial_peers": list(request["initial_peers"]),
            "dht_prefix": request["dht_prefix"],
            "max_retries": int(request["max_retries"]),
            "request_timeout": float(request["request_timeout"]),
            "connect_timeout": float(request["connect_timeout"]),
            "daemon_startup_timeout": float(request["daemon_startup_timeout"]),
            "min_backoff": float(request.get("min_backoff", 1.0)),
            "max_backoff": float(request.get("max_backoff", 10.0)),
            "show_route": False,
        }
        config = _config_class(request["config"].get("model_type")).from_dict(dict(request["config"]))
        for key, value in settings.items():
            setattr(config, key, value)
        self.blocks = RemoteSequential(config)
        manager = self.blocks.sequence_manager
        manager.rpc_info  # noqa: B018  (asks a server of block 0; retries, then raises MissingBlocksError)
        for attempt in range(config.max_retries):  # servers that are still joining announce their blocks soon
            try:
                spans = manager.make_sequence(0, len(manager.block_uids), mode="max_throughput")
                break
            except Exception:
                if attempt + 1 == config.max_retries:
                    raise
                time.sleep(manager.get_retry_delay(attempt + 1))
                manager.update(wait=True)
        return {"ok": True, "spans": [(s.start, s.end, str(s.peer_id)) for s in spans],
                "n_blocks": len(manager.block_uids)}

    def forward(self, request: dict) -> dict:
        """Petals' chained forward over every remote block, per sub-batch of at most ``MAX_TOKENS_IN_BATCH``
        tokens (as ``RemoteSequential`` does). With ``grad``, the span inputs and routes are kept for backwards."""
        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
        from petals.client.sequential_autograd import _gather_forward

        hidden = request["hidden"]
        manager = self.blocks.sequence_manager
        batches = hidden.split(_sub_batch(hidden))
        outputs = RemoteExpertWorker.run_coroutine(_gather_forward(batches, [_dummy()] * len(batches), manager))
        handle = None
        if request.get("grad"):
            handle = self.next_handle
            self.next_handle += 1
            self.graphs[handle] = [(inputs, spans) for _, inputs, spans in outputs]
        return {"ok": True, "output": _cat([out for out, _, _ in outputs]), "handle": handle}

    def backward(self, request: dict) -> dict:
        """Petals' chained backward of a kept forward. Petals' own autograd function pops its saved lists, so it
        allows one backward per forward; copies of the lists allow as many as distattr asks for."""
        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
        from petals.client.sequential_autograd import _gather_backward

        saved = self.graphs[request["handle"]]
        grads = request["grad_output"].split(_sub_batch(request["grad_output"]))
        if len(grads) != len(saved):
            raise ValueError(f"grad_output {tuple(request['grad_output'].shape)} does not match the forward's batch")
        outputs = RemoteExpertWorker.run_coroutine(_gather_backward(
            grads, [list(inputs) for inputs, _ in saved], [_dummy()] * len(saved),
            [list(spans) for _, spans in saved], self.blocks.sequence_manager))
        return {"ok": True, "grad_input": _cat([grad_inputs[0] for grad_inputs, _ in outputs])}


def _sub_batch(hidden) -> int:
    from petals.client.sequential_autograd import MAX_TOKENS_IN_BATCH

    return max(MAX_TOKENS_IN_BATCH // hidden.shape[1], 1)


def _dummy():
    from petals.utils.misc import DUMMY

    return DUMMY


def _cat(tensors):
    import torch

    return torch.cat(tensors, dim=0)


def _config_class(model_type: str | None):
    """The Petals config class of a model type (petals 2.2 supports llama, bloom, falcon and mixtral)."""
    from petals.utils.auto_config import _CLASS_MAPPING

    mapping = _CLASS_MAPPING.get(model_type)
    if mapping is None:
        raise ValueError(f"Petals 2.2 does not support model type {model_type!r}; supported: {sorted(_CLASS_MAPPING)}")
    return mapping.config


def serve_client() -> None:
    """Answer requests on stdin/stdout until ``close`` or end of input."""
    channel_in = os.fdopen(os.dup(0), "rb")
    channel_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything petals or hivemind print goes to stderr, never into the message stream
    import torch

    torch.set_num_threads(1)
    shim_hivemind()
    import petals  # noqa: F401  (slow imports happen before the first request's clock starts)

    write_message(channel_out, {"ok": True, "ready": True})
    client = _Client()
    handlers = {"open": client.open, "forward": client.forward, "backward": client.backward}
    while True:
        request = read_message(channel_in)
        if request is None or request.get("op") == "close":
            break
        for handle in request.get("release", ()):
            client.graphs.pop(handle, None)
        try:
            reply = handlers[request["op"]](request)
        except Exception as err:  # reported to distattr, which raises it there
            reply = {"ok": False, "kind": type(err).__name__, "error": str(err) or repr(err),
                     "traceback": traceback.format_exc(limit=8)}
        write_message(channel_out, reply)


# ------------------------------------------------------------------------------------------------ swarm


def print_identity(path: str) -> None:
    shim_hivemind()
    from hivemind.p2p import P2P, PeerID

    if not os.path.isfile(path):
        P2P.generate_identity(path)
    with open(path, "rb") as f:
        print(PeerID.from_identity(f.read()).to_base58())


def run_petals_cli(module: str, args: list[str]) -> None:
    import importlib

    shim_hivemind()
    sys.argv = [module, *args]
    importlib.import_module(module).main()


def main(argv: list[str]) -> None:
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command == "client":
        serve_client()
    elif command == "server":
        run_petals_cli("petals.cli.run_server", args)
    elif command == "dht":
        run_petals_cli("petals.cli.run_dht", args)
    elif command == "identity" and len(args) == 1:
        print_identity(args[0])
    else:
        sys.exit("usage: petals_worker.py client | server ARGS... | dht ARGS... | identity PATH")


if __name__ == "__main__":
    main(sys.argv[1:])
