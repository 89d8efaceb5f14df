"""A lease on a store: one driver at a time writes a store, and a second one is told who holds it.

The lease is a JSON object ``lease.json`` at the store's root (beside Zarr's ``zarr.json``, ignored by Zarr and
xarray), written through fsspec so that it works wherever the store does (local paths, ``s3://``)::

    {"host": "node-3", "pid": 4121, "started": "2025-05-01T10:00:00+00:00",
     "heartbeat": "2025-05-01T10:12:30.512+00:00", "token": "9f1c..."}

:func:`acquire` takes it: a live holder answers :class:`~distattr.store.errors.StoreBusy` (one line: host, pid,
start time, seconds since its heartbeat); a stale one (heartbeat older than ``stale_after_s``, or a holder on this
host whose process is gone) is taken over, and :attr:`Lease.took_over` says whose it was. After writing, the lease
is read back after :data:`SETTLE_S`: when two drivers raced, the one whose token is not there backs off with
:class:`StoreBusy`. The holder calls :meth:`Lease.refresh` every ~30 s and :meth:`Lease.release` at the end.
Object stores offer no compare-and-swap here, so the race check is best effort: it holds as long as a driver writes
its lease within :data:`SETTLE_S` of reading that there was none.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from .errors import StoreBusy

__all__ = ["LEASE_NAME", "Lease", "StoreBusy", "acquire", "check_free", "holder"]

LEASE_NAME = "lease.json"
SETTLE_S = 0.5  # wait before reading a new lease back, to see whether another driver's write won


@dataclass(frozen=True)
class Lease:
    """The lease this driver holds on the store at ``url`` (see :func:`acquire`). ``took_over``: None, or a
    description of the stale holder whose lease was taken over."""

    url: str
    storage_options: dict | None
    host: str
    pid: int
    started: str
    token: str
    took_over: str | None = None

    def refresh(self) -> None:
        """Rewrite the heartbeat (one read and one small write); :class:`StoreBusy` if another driver took the
        lease over meanwhile (this driver was considered stale): it must stop writing."""
        fs, path = _location(self.url, self.storage_options)
        current = _read(fs, path)
        if current is not None and current.get("token") != self.token:
            raise StoreBusy(f"{self.url}: this driver's lease was taken over by {_describe(current)}; stop writing "
                            "(the other driver continues the job)")
        _write(fs, path, self._record())

    def release(self) -> None:
        """Delete the lease if it is still this driver's (another driver's lease is left alone)."""
        fs, path = _location(self.url, self.storage_options)
        current = _read(fs, path)
        if current is not None and current.get("token") == self.token:
            fs.rm_file(path)

    def _record(self) -> dict:
        return {"host": self.host, "pid": self.pid, "started": self.started, "heartbeat": _now(),
                "token": self.token}


def acquire(url: str, storage_options: dict | None = None, *, stale_after_s: float = 120.0,
            force_new: bool = False) -> Lease:
    """Take the lease on the store at ``url``: :class:`StoreBusy` when a live driver holds it; a stale lease is taken
    over (see the module docstring). ``force_new`` takes it even from a live holder (the user's word that it is
    gone); :attr:`Lease.took_over` then names that holder too."""
    fs, path = _location(url, storage_options)
    current = _read(fs, path)
    took_over = None
    if current is not None:
        reason = _stale_reason(current, stale_after_s)
        if reason is None and not force_new:
            raise StoreBusy(_busy_message(url, current, stale_after_s))
        took_over = f"{_describe(current)}: {reason or 'taken over by force'}"
    lease = Lease(url=str(url), storage_options=storage_options, host=socket.gethostname(), pid=os.getpid(),
                  started=_now(), token=secrets.token_hex(16), took_over=took_over)
    _write(fs, path, lease._record())
    time.sleep(SETTLE_S)
    back = _read(fs, path)
    if back is None or back.get("token") != lease.token:
        raise StoreBusy(_busy_message(url, back, stale_after_s) if back else
                        f"{url}: the lease vanished while it was being taken (another driver released or replaced "
                        "it); rerun to try again")
    return lease


def check_free(url: str, storage_options: dict | None = None, stale_after_s: float = 120.0) -> None:
    """:class:`StoreBusy` when a live driver holds the store at ``url`` (e.g. before ``--new-store`` replaces it);
    nothing when there is no lease or only a stale one."""
    fs, path = _location(url, storage_options)
    current = _read(fs, path)
    if current is not None and _stale_reason(current, stale_after_s) is None:
        raise StoreBusy(_busy_message(url, current, stale_after_s))


def holder(url: str, storage_options: dict | None = None) -> dict | None:
    """The lease record at ``url`` (host, pid, started, heartbeat, token), or None when there is none."""
    fs, path = _location(url, storage_options)
    return _read(fs, path)


def _location(url: str, storage_options: dict | None):
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    return fs, f"{root.rstrip('/')}/{LEASE_NAME}"


def _read(fs, path: str) -> dict | None:
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    if not isinstance(record, dict):  # unreadable: a write cut short; treated as a stale lease of nobody known
        return {"host": "?", "pid": -1, "started": "?", "heartbeat": "1970-01-01T00:00:00+00:00", "token": ""}
    return record


def _write(fs, path: str, record: dict) -> None:
    if "file" in fs.protocol or "local" in fs.protocol:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, json.dumps(record).encode())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _age_s(record: dict) -> float:
    try:
        beat = datetime.fromisoformat(str(record.get("heartbeat")))
    except ValueError:
        return float("inf")
    if beat.tzinfo is None:
        beat = beat.replace(tzinfo=UTC)
    return (datetime.now(UTC) - beat).total_seconds()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _stale_reason(record: dict, stale_after_s: float) -> str | None:
    """Why ``record`` no longer holds the store, or None while its driver is alive."""
    age = _age_s(record)
    if age > stale_after_s:
        return f"its heartbeat is {age:.0f} s old (more than {stale_after_s:g} s)"
    if record.get("host") == socket.gethostname() and not _alive(int(record.get("pid", -1))):
        return f"its process {record.get('pid')} on this host is gone"
    return None


def _describe(record: dict) -> str:
    return (f"host {record.get('host')}, pid {record.get('pid')}, started {record.get('started')}, last heartbeat "
            f"{_age_s(record):.0f} s ago")


def _busy_message(url: str, record: dict, stale_after_s: float) -> str:
    return (f"{url} is in use by another driver ({_describe(record)}); wait for it to finish or stop it (its lease "
            f"is taken over once its heartbeat is {stale_after_s:g} s old)")
