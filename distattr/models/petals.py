"""Attribution through a Petals swarm: ``load_model("petals://<model>?initial_peers=...&dht_prefix=...")``.

The boundary. Petals 2.2 (its last release) pins transformers 4.3x, so its client cannot live in
distattr's process (transformers 5). It runs in its own virtualenv (``cluster/petals/build_env.sh``)
as a *worker process* (:mod:`distattr.models.petals_worker`, run by path, importing nothing from
distattr), optionally inside a network namespace, and distattr talks to it over the worker's
stdin/stdout pipes with length-prefixed ``torch.save`` messages (pipes cross network namespaces,
loopback sockets do not).

In distattr's process the model is the ordinary transformers model *without its decoder blocks*: the
embeddings, final norm, LM head and rotary tables are loaded locally, and the block list holds one
:class:`RemoteBlocks` module (``model.layers.remote``) whose forward sends the hidden states ``[B, L, d]``
to the worker (remote forward through every block) and whose backward sends ``grad_output`` back (remote
backward; the worker keeps each span's input and route, the servers recompute their activations). So
distattr's gradient kernels, perturbation methods and step functions run unchanged, with the same
numbers as a local model (the servers run the same blocks). Methods that read attention weights or
hidden states inside the blocks (``attention``, ``value_zeroing``, layer methods on a block) cannot run
remotely and are refused with an error.

Petals' client asserts an all-ones attention mask. distattr's rows are right-padded without a mask,
which a causal decoder does not need (padding never reaches earlier positions), so they go through as
they are; left-padded generation batches are split into runs of rows that start at the same position.
Generation runs without a KV cache (every step recomputes the prefix remotely).

distattr's step backwards are batched with ``vmap`` (``is_grads_batched``); the remote backward is a
custom operator without a batching rule, so ``vmap`` loops over the batched step slots and sends one
backward request per slot (the operator finds its client through ``_CLIENTS``, keyed by ``id``: one
process-local table, so a ``petals://`` model loads in any process, e.g. each Ray actor, on its own).

Errors a caller can recover from share one type, :class:`PetalsUnavailable` (a ``RuntimeError``): the worker
timed out, exited or was stopped, the initial peers did not answer, or the swarm lacks blocks. The client that
raised it is gone (or the swarm was not ready), so the remedy is a new client (``load_model`` again) after a
pause; :func:`is_unavailable` also finds one wrapped in another exception. Its subclasses keep the built-in
types callers already catch: :class:`PetalsTimeout` is a ``TimeoutError``, :class:`PetalsUnreachable` a
``ConnectionError``. Anything else (bad input, a refused method, a missing Petals environment) is not one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import select
import signal
import struct
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path

import torch
from torch import nn

from ..logs import quiet_transformers
from .loaded import LoadedModel, fill_special_tokens

# the spec's parsing lives in petals_spec (no client, no transformers); its names stay importable from here
from .petals_spec import ENV_NAME, SCHEME, PetalsSpec, default_python, is_petals_spec, parse_spec  # noqa: F401
from .sources import config_kwargs, own_tokenizer_kwargs, resolve_folder

logger = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("petals_worker.py")
# Environment of every Petals/hivemind process: no hub, no PyPI version check, no proxy-less HTTP.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
    "PYTHONUNBUFFERED": "1",
}
STARTUP, STARTUP_TIMEOUT = "start up", 180.0  # seconds for the worker's imports (torch, hivemind, petals)
# Exceptions of the worker (its type names, as it reports them) after which the swarm, not the request, is at fault:
# Petals re-raises the last failure once its retries (max_retries) are spent: a request that timed out (asyncio's
# and the built-in TimeoutError share the name), a p2p daemon that failed (hivemind's P2PDaemonError), a lost
# connection, or no server holding a block (MissingBlocksError, from routing).
UNAVAILABLE_KINDS = frozenset({
    "TimeoutError", "MissingBlocksError", "P2PDaemonError",
    "ConnectionError", "ConnectionResetError", "ConnectionRefusedError", "ConnectionAbortedError",
})


class PetalsUnavailable(RuntimeError):
    """The swarm or the Petals client process stopped answering; a new client may succeed.

    Raised when a request timed out (:class:`PetalsTimeout`), the worker process exited (a broken pipe, end of
    its output), the client was stopped earlier (by a timeout, an exit or ``close``), the initial peers could
    not be reached (:class:`PetalsUnreachable`), or the swarm lacks blocks or failed after Petals' own retries
    (a worker exception named in :data:`UNAVAILABLE_KINDS`; a retry later may find the servers). After a
    timeout, an exit or a stop the client answers no further request; recover by loading the model again (a new
    worker process), after a pause and a bounded number of times. :func:`is_unavailable` also recognises one
    that arrives wrapped in another exception.
    """


class PetalsTimeout(PetalsUnavailable, TimeoutError):
    """No answer in time: the worker did not reply within the request's deadline (``timeout=``; the worker was
    then killed), or Petals' requests to the servers timed out after its retries (reported by the worker)."""


class PetalsUnreachable(PetalsUnavailable, ConnectionError):
    """The swarm's initial peers could not be reached."""


def is_unavailable(err: BaseException | None) -> bool:
    """Whether ``err`` is, or was caused by, a :class:`PetalsUnavailable`.

    Follows the ``__cause__`` / ``__context__`` chain (``raise ... from err`` and exceptions raised while
    handling one) and the ``cause`` attribute of wrappers that keep the original there, such as Ray's
    ``RayTaskError``; each exception is visited once, so a cyclic chain ends.
    """
    seen: set[int] = set()
    pending = [err]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        if isinstance(current, PetalsUnavailable):
            return True
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        pending.extend(e for e in (current.__cause__, current.__context__, cause) if isinstance(e, BaseException))
    return False


def netns_command(netns: str | None, argv: list[str], env: dict | None = None) -> list[str]:
    """``argv`` with the offline environment (plus ``env``), inside network namespace ``netns`` when given
    (``ip netns exec`` and ``env`` both exec, so the started process's PID is the program's own)."""
    variables = ["env", *[f"{k}={v}" for k, v in {**OFFLINE_ENV, **(env or {})}.items()]]
    return (["ip", "netns", "exec", netns] if netns else []) + variables + argv


# ------------------------------------------------------------------------------------------------ model folder


def legacy_config(config) -> dict:
    """The config of ``config`` (a transformers 5 ``PretrainedConfig``) as transformers 4.3x reads it: rope
    settings at top level, ``torch_dtype``, no quantization or version fields."""
    data = config.to_dict()
    rope = data.pop("rope_parameters", None) or {}
    if "rope_theta" in rope:
        data["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        data["rope_scaling"] = {"type": scaling.pop("rope_type"), **scaling}
    else:
        data["rope_scaling"] = None
    data["torch_dtype"] = str(data.pop("dtype", None) or "float32").replace("torch.", "")
    for key in ("quantization_config", "transformers_version", "_name_or_path", "_model_name_or_path"):
        data.pop(key, None)
    return data


def export_model_folder(model: str, folder: str | Path) -> Path:
    """Write a model folder that Petals servers (transformers 4.3x) can serve: a legacy ``config.json`` and
    links to the safetensors weights of ``model`` (``smollm2-135m``, a ``.gguf`` file or a local folder)."""
    import json

    from transformers import AutoConfig

    source, _ = resolve_folder(model)
    source_dir = Path(source)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"Petals servers need the model's files on disk; {model!r} is not a local folder")
    weights = sorted(source_dir.glob("*.safetensors")) + sorted(source_dir.glob("*.safetensors.index.json"))
    if not weights:
        raise FileNotFoundError(f"No safetensors weights in {source_dir}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = legacy_config(AutoConfig.from_pretrained(source_dir))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for path in weights:
        link = folder / path.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(path.resolve())
    return folder


# ------------------------------------------------------------------------------------------------ client


def _frame(message: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(message, buffer)
    payload = buffer.getvalue()
    return struct.pack(">Q", len(payload)) + payload


class PetalsClient:
    """The worker process of one remote model and the request/reply exchange with it (one at a time)."""

    def __init__(self, spec: PetalsSpec, config_dict: dict, command: list[str] | None = None):
        self.spec = spec
        python = Path(spec.python)
        if command is None and not python.is_file():
            raise FileNotFoundError(
                f"The Petals environment is missing ({python}). Build it with: bash cluster/petals/build_env.sh "
                "(or pass python=<interpreter> in the petals:// spec, or set $DISTATTR_PETALS_PYTHON)")
        # the worker's stderr: a file without a name, so nothing is left behind however this process ends
        self.log = tempfile.TemporaryFile(prefix="distattr-petals-")  # noqa: SIM115 (closed by _stop_process)
        argv = command or netns_command(spec.netns, [str(python), str(WORKER), "client"])
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                        start_new_session=True)
        self._finalizer = weakref.finalize(self, _stop_process, self.process, self.log)
        logger.debug("started the Petals client worker (pid %d, network namespace %s)", self.process.pid,
                     spec.netns or "this one")
        self._lock = threading.Lock()
        self.released: list[int] = []  # handles of forwards whose graphs distattr no longer holds
        self.closed_reason: str | None = None
        try:
            self._exchange(None, STARTUP, STARTUP_TIMEOUT)  # imports: not the swarm's time
            self.info = self.request({
                "op": "open", "config": config_dict, "initial_peers": list(spec.initial_peers),
                "dht_prefix": spec.dht_prefix, "max_retries": spec.max_retries, "request_timeout": spec.timeout,
                "connect_timeout": min(5.0, spec.timeout), "daemon_startup_timeout": spec.timeout,
            }, what="connect to the swarm")
        except BaseException:
            self._stop("it could not connect")
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def request(self, message: dict, what: str) -> dict:
        """Send one request and wait for its reply (at most ``spec.timeout`` seconds)."""
        return self._exchange(message, what, self.spec.timeout)

    def _exchange(self, message: dict | None, what: str, timeout: float) -> dict:
        with self._lock:
            if self.closed_reason is not None:
                raise PetalsUnavailable(f"The Petals client was stopped earlier: {self.closed_reason}")
            try:
                if message is not None:
                    released, self.released = self.released, []
                    self.process.stdin.write(_frame({**message, "release": released}))
                    self.process.stdin.flush()
                reply = self._read_reply(what, timeout)
            except BrokenPipeError:
                reply = None
            if reply is None:
                tail = self.log_tail()
                self._stop(f"the worker exited while trying to {what}")
                raise PetalsUnavailable(f"The Petals worker exited while trying to {what} ({self._where()}).\n{tail}")
        if not reply["ok"]:
            raise self._remote_error(reply, what)
        return reply

    def _remote_error(self, reply: dict, what: str) -> Exception:
        kind, error = reply["kind"], reply["error"]
        if kind == "MissingBlocksError":
            blocks = re.search(r"blocks (.*?) are online", error)
            return PetalsUnavailable(
                f"The Petals swarm lacks blocks: no server announces block(s) {blocks[1] if blocks else '?'} under "
                f"dht_prefix={self.spec.dht_prefix!r} (initial_peers={','.join(self.spec.initial_peers)}). Check the "
                "prefix and that the servers cover every block (python cluster/petals/swarm.py status --dir ...)")
        if "failed to connect to bootstrap peers" in error:
            return PetalsUnreachable(f"Could not reach the Petals swarm's initial peers "
                                     f"{', '.join(self.spec.initial_peers)}: {error.strip()}")
        message = f"Petals failed to {what} ({self._where()}): {kind}: {error}\n{reply.get('traceback', '')}"
        if kind == "TimeoutError":
            return PetalsTimeout(message)
        return PetalsUnavailable(message) if kind in UNAVAILABLE_KINDS else RuntimeError(message)

    def forward(self, hidden: torch.Tensor, grad: bool) -> tuple[torch.Tensor, int | None]:
        reply = self.request({"op": "forward", "hidden": hidden.detach().cpu().contiguous(), "grad": grad},
                             what="run a forward through the remote blocks")
        return reply["output"], reply["handle"]

    def backward(self, handle: int, grad_output: torch.Tensor) -> torch.Tensor:
        reply = self.request({"op": "backward", "handle": handle, "grad_output": grad_output.cpu().contiguous()},
                             what="run a backward through the remote blocks")
        return reply["grad_input"]

    def release(self, handle: int) -> None:
        """Let the worker drop a forward's graph (sent along with the next request)."""
        self.released.append(handle)

    def close(self) -> None:
        self._stop("closed")

    def log_tail(self, lines: int = 15) -> str:
        """The end of the worker's stderr (read without moving the offset the worker writes at)."""
        try:
            fd = self.log.fileno()
            size = os.fstat(fd).st_size
            text = os.pread(fd, min(size, 1 << 16), max(0, size - (1 << 16))).decode(errors="replace")
        except (OSError, ValueError):  # closed with the client
            return ""
        return "Last lines of the worker's log:\n" + "\n".join(text.splitlines()[-lines:])

    def _where(self) -> str:
        return f"initial_peers={','.join(self.spec.initial_peers)}, dht_prefix={self.spec.dht_prefix}"

    def _stop(self, reason: str, hung: bool = False) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
            logger.info("stopping the Petals client worker (pid %d): %s", self.process.pid, reason)
        if hung:  # no graceful close for a worker stuck in a request
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self._finalizer()

    def _read_reply(self, what: str, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        header = self._read_exact(fd, 8, deadline, what, timeout)
        if header is None:
            return None
        (size,) = struct.unpack(">Q", header)
        payload = self._read_exact(fd, size, deadline, what, timeout)
        if payload is None:
            return None
        return torch.load(io.BytesIO(payload), weights_only=True)

    def _read_exact(self, fd: int, size: int, deadline: float, what: str, timeout: float) -> bytes | None:
        chunks, remaining = [], size
        while remaining:
            wait = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(wait, 0))
            if not ready:
                tail = self.log_tail()
                self._stop(f"timed out trying to {what}", hung=True)
                who = "worker" if what == STARTUP else "swarm"
                raise PetalsTimeout(
                    f"The Petals {who} did not answer within {timeout:g} s while trying to {what} "
                    f"({self._where()}); the client was stopped. Check that the swarm is up and serves every block "
                    f"(cluster/petals/swarm.py status), or raise timeout= in the petals:// spec.\n{tail}")
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)


def _stop_process(process: subprocess.Popen, log) -> None:
    """Stop a worker by its PID (its process group: the worker and the p2p daemon it started)."""
    if process.poll() is None:
        try:
            process.stdin.write(_frame({"op": "close"}))
            process.stdin.flush()
            process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired) as err:  # gone already, or stuck: the signals below end it
            logger.debug("the Petals client worker (pid %d) did not close on request (%s); signalling it",
                         process.pid, type(err).__name__)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            break
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    for stream in (process.stdin, process.stdout):
        with contextlib.suppress(OSError):
            stream.close()
    log.close()


# ------------------------------------------------------------------------------------------------ remote blocks

_CLIENTS: weakref.WeakValueDictionary[int, PetalsClient] = weakref.WeakValueDictionary()


@torch.library.custom_op("distattr::petals_backward", mutates_args=())
def _petals_backward(grad_output: torch.Tensor, client: int, handle: int) -> torch.Tensor:
    """``grad_input [B, L, d]`` of a remote forward. An operator without a batching rule, so that a batched
    (``vmap``) backward loops over its slots instead of handing a batched tensor to the pipe."""
    return _CLIENTS[client].backward(handle, grad_output).to(grad_output)


class _Handle:
    """A remote forward's graph; the worker may drop it once distattr's autograd graph is gone."""

    def __init__(self, client: PetalsClient, value: int):
        self.client, self.value = client, value

    def __del__(self):
        self.client.release(self.value)


class _RemoteBlocksFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, client: PetalsClient) -> torch.Tensor:
        output, handle = client.forward(hidden, grad=True)
        ctx.handle = _Handle(client, handle)
        return output.to(hidden)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        handle = ctx.handle
        return torch.ops.distattr.petals_backward(grad_output, id(handle.client), handle.value), None


class RemoteBlocks(nn.Module):
    """Every decoder block of the model, run by the swarm: ``[B, L, d] -> [B, L, d]``.

    Stands in for the model's block list (``model.layers.remote``); it takes the keyword arguments a
    transformers decoder layer takes and checks that they mean what the remote blocks compute: causal
    attention from position 0 of each row, no KV cache.
    """

    def __init__(self, client: PetalsClient, n_blocks: int):
        super().__init__()
        self.client = client
        self.n_blocks = n_blocks
        _CLIENTS[id(client)] = client

    def extra_repr(self) -> str:
        spans = ", ".join(f"{a}:{b}@{peer[-6:]}" for a, b, peer in self.client.info.get("spans", []))
        return f"blocks=0:{self.n_blocks}, dht_prefix={self.client.spec.dht_prefix!r}, spans=[{spans}]"

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, cache=None,
                use_cache=None, **kwargs) -> torch.Tensor:
        cache = cache if cache is not None else kwargs.get("past_key_values")  # its name before transformers 5.2x
        if cache is not None and cache.get_seq_length() > 0:
            raise RuntimeError("A KV cache cannot be used with remote Petals blocks (generation runs without one)")
        starts = _row_starts(attention_mask, position_ids, hidden_states.shape[:2])
        needs_grad = torch.is_grad_enabled() and hidden_states.requires_grad
        if starts is None:
            if needs_grad:
                return _RemoteBlocksFunction.apply(hidden_states, self.client)
            return self.client.forward(hidden_states, grad=False)[0].to(hidden_states)
        if needs_grad:
            raise ValueError("Left-padded rows cannot be differentiated through remote Petals blocks")
        output = hidden_states.clone()
        for start in sorted(set(starts.tolist())):
            rows = (starts == start).nonzero().squeeze(-1)
            output[rows, start:] = self.client.forward(hidden_states[rows, start:], grad=False)[0].to(hidden_states)
        return output


def _row_starts(attention_mask, position_ids, shape: torch.Size) -> torch.Tensor | None:
    """First real position of each row (left padding), or None when every row starts at 0.

    Rows must be causal from their first real position: a 4-D mask (``[B, 1, L, L]``, bool or additive)
    whose last query sees a contiguous suffix of keys, and position ids counting from 0 there.
    """
    batch, length = shape
    if attention_mask is None:
        starts = torch.zeros(batch, dtype=torch.long)
    else:
        if attention_mask.dim() != 4:
            raise ValueError(f"Unexpected attention mask of shape {tuple(attention_mask.shape)} for remote blocks")
        last = attention_mask[:, 0, -1, :].cpu()
        visible = last if last.dtype == torch.bool else last == 0
        starts = length - visible.sum(-1)
        expected = torch.arange(length)[None] >= starts[:, None]
        if not torch.equal(visible.expand_as(expected), expected):
            raise ValueError("Remote Petals blocks need rows that are causal from their first real token "
                             "(left padding at most); this attention mask is not")
    if position_ids is not None:
        positions = position_ids.cpu().expand(batch, length)
        expected = (torch.arange(length)[None] - starts[:, None]).clamp(min=0)
        real = torch.arange(length)[None] >= starts[:, None]
        if not torch.equal(positions[real], expected[real]):
            raise ValueError("Remote Petals blocks number positions from 0 at each row's first token; "
                             "these position ids differ")
    return None if not starts.any() else starts


# ------------------------------------------------------------------------------------------------ loading


def load_remote(url: str, tokenizer=None, *, dtype=None, device=None, model_kwargs: dict | None = None,
                tokenizer_kwargs: dict | None = None, command: list[str] | None = None, **unsupported):
    """Load the local parts of a ``petals://`` model and connect its blocks to the swarm.

    Returns a :class:`~distattr.models.loaded.LoadedModel` whose ``source`` records the swarm.
    ``model_kwargs`` reach the local parts' ``from_pretrained`` and, as :mod:`.sources` says which, their config
    and tokenizer. ``command`` replaces the worker command line (tests). ``unsupported``: loading options that do
    not apply to a remote model (``device_map``, ``quantization``...): an error unless None.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    given = sorted(k for k, v in unsupported.items() if v is not None)
    if given:
        raise ValueError(f"{', '.join(given)} do not apply to a petals:// model: its blocks' placement and precision "
                         "are the servers' (run_server --torch_dtype / --quant_type)")
    spec = parse_spec(url)
    with quiet_transformers():
        folder, _ = resolve_folder(spec.model)
        config = AutoConfig.from_pretrained(folder, **config_kwargs(model_kwargs))
        if config.model_type != "llama":
            raise ValueError(f"petals:// supports Llama-architecture models (model_type 'llama'), not "
                             f"{config.model_type!r}: Petals 2.2 also serves BLOOM, Falcon and Mixtral, whose block "
                             "lists distattr does not replace yet")
        tokenizer = _local_tokenizer(folder, tokenizer, model_kwargs, tokenizer_kwargs)
        n_blocks = config.num_hidden_layers
        kwargs = dict(model_kwargs or {})
        kwargs["dtype"] = (getattr(torch, dtype) if isinstance(dtype, str) else dtype) or torch.float32
        logger.info("connecting to the Petals swarm (%s) for the blocks of %s", spec.dht_prefix, folder)
        client = PetalsClient(spec, legacy_config(config), command=command)  # first: a bad swarm fails fast
        try:
            if client.info["n_blocks"] != n_blocks:
                raise ValueError(f"The swarm serves {client.info['n_blocks']} blocks, the model has {n_blocks}")
            # the blocks live in the swarm: build the model without them, then put the remote stand-in in their place
            model = AutoModelForCausalLM.from_pretrained(folder, num_hidden_layers=0, **kwargs)
        except BaseException:
            client.close()
            raise
    model.config.num_hidden_layers = n_blocks
    blocks = nn.ModuleList()
    blocks.add_module("remote", RemoteBlocks(client, n_blocks))
    _decoder(model).layers = blocks
    model.config.use_cache = False
    model.generation_config.use_cache = False
    if device is not None:
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    fill_special_tokens(model, tokenizer)
    source = {"kind": "petals", "path": folder, "initial_peers": list(spec.initial_peers),
              "dht_prefix": spec.dht_prefix, "spans": [list(s) for s in client.info["spans"]]}
    return LoadedModel(model=model, tokenizer=tokenizer, name=url, source=source)


def _local_tokenizer(folder: str, tokenizer, model_kwargs: dict | None, given_kwargs: dict | None):
    """The tokenizer object: ``tokenizer`` as given, or loaded by its name, or (None) the local parts' own, read
    with the hub keys of ``model_kwargs`` (see :func:`.sources.own_tokenizer_kwargs`)."""
    from transformers import AutoTokenizer

    if tokenizer is None:
        return AutoTokenizer.from_pretrained(folder, **own_tokenizer_kwargs(model_kwargs, given_kwargs))
    if isinstance(tokenizer, str):
        return AutoTokenizer.from_pretrained(tokenizer, **(given_kwargs or {}))
    return tokenizer


def _decoder(model: nn.Module) -> nn.Module:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if decoder is None or not hasattr(decoder, "layers"):
        raise ValueError(f"Cannot find the decoder blocks of {type(model).__name__} to serve them through Petals")
    return decoder

