"""The ``petals://`` model spec: ``load_model("petals://<model>?initial_peers=...&dht_prefix=...")``.

Parsing only, with no Petals client and no transformers: what :func:`distattr.models.sources.resolve_folder` (the
model's local parts), :mod:`distattr.models.identity` and :mod:`distattr.models.petals` (the swarm) read from
such a spec. See :mod:`distattr.models.petals` for how the blocks run remotely.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from .embedded import cache_root

SCHEME = "petals://"
ENV_NAME = "petals-env-v1"  # cluster/petals/build_env.sh builds it under the distattr cache folder
_QUERY_KEYS = ("initial_peers", "dht_prefix", "netns", "timeout", "max_retries", "python")


@dataclass(frozen=True)
class PetalsSpec:
    """A parsed ``petals://`` model spec.

    Attributes:
        model: the local parts' source: ``smollm2-135m``, a model folder or a hub id (same as ``load_model``).
        initial_peers: multiaddrs of the swarm's DHT (``/ip4/127.0.0.1/tcp/31337/p2p/Qm...``).
        dht_prefix: the prefix the servers announce their blocks under (``run_server --dht_prefix``).
        netns: run the client worker inside this network namespace (``ip netns exec``); None: here.
        timeout: seconds one request (retries included) may take before distattr stops the client.
        max_retries: Petals' retries of a failed remote call (Petals' own default retries forever).
        python: the Petals environment's interpreter.
    """

    model: str
    initial_peers: tuple[str, ...]
    dht_prefix: str
    netns: str | None = None
    timeout: float = 120.0
    max_retries: int = 3
    python: str = field(default_factory=lambda: default_python())


def default_python() -> str:
    """The Petals environment's interpreter: ``$DISTATTR_PETALS_PYTHON``, else the one
    ``cluster/petals/build_env.sh`` builds in ``$DISTATTR_CACHE`` (default ``~/.cache/distattr``)."""
    return os.environ.get("DISTATTR_PETALS_PYTHON") or str(cache_root() / ENV_NAME / "bin" / "python")


def is_petals_spec(model: object) -> bool:
    """Whether ``model`` is a ``petals://`` spec string (a model object or another name is not)."""
    return isinstance(model, str) and model.startswith(SCHEME)


def parse_spec(url: str) -> PetalsSpec:
    """``petals://<model>?initial_peers=<maddr>[,<maddr>]&dht_prefix=<prefix>[&netns=..&timeout=..&max_retries=..
    &python=..]``; ``initial_peers`` may also be repeated."""
    if not is_petals_spec(url):
        raise ValueError(f"A Petals model spec starts with {SCHEME!r}: {url!r}")
    model, _, query = url[len(SCHEME):].partition("?")
    params = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(params) - set(_QUERY_KEYS))
    if unknown:
        raise ValueError(f"Unknown Petals spec parameter(s) {unknown}; valid: {', '.join(_QUERY_KEYS)}")
    peers = tuple(p for value in params.get("initial_peers", []) for p in value.split(",") if p)
    if not model:
        raise ValueError(f"No model in {url!r}: petals://<model>?initial_peers=...&dht_prefix=...")
    if not peers:
        raise ValueError(f"{url!r} names no initial_peers (the swarm's DHT multiaddr, /ip4/.../tcp/.../p2p/...)")
    prefix = params.get("dht_prefix", [""])[-1]
    if not prefix:
        raise ValueError(f"{url!r} names no dht_prefix (the prefix the servers announce their blocks under)")
    extra = {}
    for key, cast in (("netns", str), ("timeout", float), ("max_retries", int), ("python", str)):
        if key in params:
            try:
                extra[key] = cast(params[key][-1])
            except ValueError:
                raise ValueError(f"Bad {key}={params[key][-1]!r} in {url!r}") from None
    if extra.get("timeout", 1.0) <= 0 or extra.get("max_retries", 1) < 1:
        raise ValueError("timeout must be positive and max_retries at least 1")
    return PetalsSpec(model=model, initial_peers=peers, dht_prefix=prefix, **extra)
