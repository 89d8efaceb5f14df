"""Secrets are never printed and never stored: which option names look like credentials, ``env:NAME`` values,
scrubbing messages, and the redacted command line kept in a store's provenance."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

REDACTED = "***"
ENV_PREFIX = "env:"  # --storage-option secret=env:NAME reads $NAME in the driver
OPTION_FLAGS = ("--storage-option", "--data-option")
_SECRET_ENDINGS = ("key", "secret", "token", "password", "passwd", "pwd", "credential", "credentials", "auth", "sas",
                   "sig", "signature")
_SECRET_PARTS = ("secret", "passw", "credential")
_NOT_SECRET = frozenset({"token-budget", "token_budget"})  # distattr's own numbers, not credentials
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@")
_URL_QUERY = re.compile(r"([?&]([^=&#\s]+)=)([^&#\s]*)")


def secret_name(name: str) -> bool:
    """Whether an option key or flag looks like it holds a credential: one of its words (split at anything but
    letters and digits) ends with key, secret, token, password, passwd, pwd, credential(s), auth, sas, sig or
    signature (``key``, ``access_key``, ``session_token``, ``sas_token``, ``hf_token``, ``apikey``), or it contains
    secret, passw or credential anywhere (``aws_secret_access_key``). ``--token-budget`` is distattr's own."""
    name = name.strip().lstrip("-").lower()
    if name in _NOT_SECRET:
        return False
    words = [w for w in re.split(r"[^a-z0-9]+", name) if w]
    return any(part in name for part in _SECRET_PARTS) or any(w.endswith(_SECRET_ENDINGS) for w in words)


def secret_values(items: list[str] | None, options: dict | None) -> set[str]:
    """The strings of ``options`` that must never be printed: values of keys that look secret (also inside nested
    dicts such as ``client_kwargs``) and every value read from the environment (``items``: the raw pairs)."""
    from_env = {item.partition("=")[0].strip() for item in items or [] if item.partition("=")[2].startswith(ENV_PREFIX)}
    out: set[str] = set()

    def walk(value, secret: bool) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, secret or secret_name(str(k)))
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v, secret)
        elif secret and isinstance(value, str | int) and not isinstance(value, bool) and len(str(value)) >= 4:
            out.add(str(value))

    for key, value in (options or {}).items():
        walk(value, secret_name(key) or key in from_env)
    return out


def scrub(text: str, hidden: Iterable[str], *, one_line: bool = True) -> str:
    """``text`` with every string of ``hidden`` replaced by ``***`` (and folded to one line unless ``one_line``
    is false)."""
    for value in sorted(hidden, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return " ".join(text.split()) if one_line else text


def redact_command(argv: Sequence[str]) -> str:
    """``argv`` as one shell-quoted line without credentials, for the store's provenance: the value of a flag that
    looks secret (``--hf-token X``, ``--password=X``), of ``KEY=VALUE`` pairs whose key does (``--storage-option
    secret=X``, ``--data-option=token=X``, ``--model-kwarg api_key=X``, a JSON value with such a key), passwords in
    URLs (``ftp://user:X@host``) and secret-looking URL query parameters (``?sig=X``) become ``***``; ``env:NAME``
    references stay (they hold no secret)."""
    import shlex

    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next and not arg.startswith("-"):  # the value of --hf-token X
            out.append(arg if arg.startswith(ENV_PREFIX) else REDACTED)
        elif arg.startswith("--") and "=" in arg:
            flag, _, value = arg.partition("=")
            secret = secret_name(flag) and not value.startswith(ENV_PREFIX)
            out.append(f"{flag}={REDACTED if secret else _redact_value(value)}")
        else:
            out.append(_redact_value(arg))
        hide_next = arg.startswith("--") and "=" not in arg and secret_name(arg)
    # shell-quoted where needed, but a redaction alone does not call for quotes: --storage-option secret=***
    return " ".join(arg if shlex.quote(arg.replace(REDACTED, "x")) == arg.replace(REDACTED, "x") else shlex.quote(arg)
                    for arg in out)


def _redact_value(value: str) -> str:
    """One argument: a ``KEY=VALUE`` pair (the key a name), or anything else that may hold a URL."""
    key, sep, rest = value.partition("=")
    if sep and re.fullmatch(r"[A-Za-z_][\w.-]*", key):
        if rest.startswith(ENV_PREFIX):
            return value
        if secret_name(key) or (rest[:1] in "{[" and rest and _holds_secret_key(rest)):
            return f"{key}={REDACTED}"
        return f"{key}={_redact_url(rest)}"
    return _redact_url(value)


def _holds_secret_key(text: str) -> bool:
    """Whether a JSON (or JSON-like) value has a key that looks secret."""
    try:
        value = json.loads(text)
    except ValueError:
        return any(secret_name(word) for word in re.findall(r"[A-Za-z_][\w-]*", text))

    def walk(item) -> bool:
        if isinstance(item, dict):
            return any(secret_name(str(k)) or walk(v) for k, v in item.items())
        return isinstance(item, list) and any(walk(v) for v in item)

    return walk(value)


def _redact_url(text: str) -> str:
    text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    return _URL_QUERY.sub(lambda m: f"{m.group(1)}{REDACTED}" if secret_name(m.group(2)) else m.group(0), text)
