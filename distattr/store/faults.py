"""Storage faults: which errors a retry can fix, which it cannot, and a retry helper for store writes.

Errors reach distattr in several shapes, depending on the path they took:

- local files: ``OSError`` with an ``errno`` (``ENOSPC``, ``EDQUOT``, ``EROFS``, ``EACCES``...), ``PermissionError``;
- S3 through s3fs (as zarr's ``FsspecStore`` calls it): s3fs retries throttling itself, then translates botocore's
  ``ClientError`` into a Python error whose ``__cause__`` is the ``ClientError``: ``AccessDenied`` and
  ``InvalidAccessKeyId`` become ``PermissionError``, ``NoSuchBucket`` ``FileNotFoundError``, ``RequestTimeout``
  ``TimeoutError``, ``InternalError`` and unknown codes (``SlowDown``, ``ServiceUnavailable``) ``OSError(EIO)`` whose
  text names the code (``An error occurred (SlowDown) when calling the PutObject operation``);
- connections: botocore's ``HTTPClientError`` / ``ConnectionError`` family, aiohttp's ``ClientConnectionError`` and
  ``ClientPayloadError``, builtin ``ConnectionError`` / ``TimeoutError``.

:func:`classify` looks at the error and its whole ``__cause__`` / ``__context__`` chain (codes, HTTP statuses, errno,
then the text as a last resort). :func:`retrying` retries transient faults with exponential backoff and jitter,
turns fatal ones into :class:`~distattr.store.errors.StorageFatal` at once (one line: what happened, where, what to
do), and re-raises anything it does not recognise unchanged.
"""

from __future__ import annotations

import errno
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import StorageFatal

__all__ = ["Fault", "RetryCount", "StorageFatal", "classify", "retrying"]

T = TypeVar("T")

TRANSIENT_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeoutException", "Throttling",
    "ThrottlingException", "ThrottledException", "RequestThrottled", "RequestLimitExceeded", "TooManyRequests",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "BandwidthLimitExceeded",
    "500", "502", "503", "504", "429"})
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
PERMISSION_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled", "AccountProblem",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "NotSignedUp", "403", "Forbidden"})
MISSING_BUCKET_CODES = frozenset({"NoSuchBucket"})
TRANSIENT_ERRNO = frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE,
                             errno.EAGAIN, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETRESET})
# "An error occurred (SlowDown) when calling the PutObject operation": the code in parentheses
CODE_IN_TEXT = re.compile(r"An error occurred \(([A-Za-z0-9]+)\)")
RESUME = "then rerun the same command to resume"


@dataclass
class RetryCount:
    """A small mutable tally that :func:`retrying` updates, so that callers can report retries.

    ``retries``: retries made so far (one per failed attempt that was retried); ``last_error``: the last retried
    error, one line."""

    retries: int = 0
    last_error: str = ""


@dataclass(frozen=True)
class Fault:
    """What :func:`classify` found: ``transient`` (a retry may succeed) or fatal, a short ``kind`` ("disk full",
    "throttled"...) and the ``detail`` the storage gave (one line)."""

    transient: bool
    kind: str
    detail: str

    def message(self, where: str) -> str:
        """One line for a fatal fault: what happened at ``where`` and what to do."""
        what = {
            "disk full": ("the store's disk is full", "free space"),
            "quota exceeded": ("the store's disk quota is exceeded", "free space or raise the quota"),
            "read-only": ("the store's file system is read-only", "make it writable"),
            "permission denied": ("permission denied on the store", "fix the credentials or the permissions"),
            "no such bucket": ("the store's bucket does not exist", "create it or fix the store URL"),
        }
        head, fix = what.get(self.kind, (f"the store failed ({self.kind})", "fix it"))
        return f"{head} ({self.detail}) at {where}: {fix}, {RESUME}"


def one_line(text: object, limit: int = 300) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    todo: list[BaseException | None] = [err]
    while todo and len(out) < 16:
        e = todo.pop(0)
        if e is None or any(e is seen for seen in out):
            continue
        out.append(e)
        todo += [e.__cause__, e.__context__]
    return out


def _client_error(e: BaseException) -> tuple[str, int | None, str] | None:
    """(code, HTTP status, message) of a botocore ``ClientError`` (or anything with its ``response`` shape)."""
    response = getattr(e, "response", None)
    if not isinstance(response, dict) or "Error" not in response:
        return None
    error = response.get("Error") or {}
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return str(error.get("Code", "")), status, str(error.get("Message", ""))


def _connection_types() -> tuple[type, ...]:
    types: list[type] = [ConnectionError, TimeoutError]
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        types += [HTTPClientError, BotoConnectionError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientConnectionError, ClientPayloadError, ServerTimeoutError

        types += [ClientConnectionError, ClientPayloadError, ServerTimeoutError]
    except ImportError:
        pass
    return tuple(types)


def _classify_one(e: BaseException) -> Fault | None:
    client = _client_error(e)
    if client is not None:
        code, status, message = client
        detail = one_line(f"{code}: {message}" if message else code)
        if code in MISSING_BUCKET_CODES:
            return Fault(False, "no such bucket", detail)
        if code in PERMISSION_CODES or status == 403:
            return Fault(False, "permission denied", detail)
        if code in TRANSIENT_CODES or status in TRANSIENT_STATUS:
            return Fault(True, "throttled or unavailable", detail)
    if isinstance(e, OSError) and e.errno is not None:
        reason = one_line(e.strerror or e)
        fatal = {errno.ENOSPC: "disk full", errno.EROFS: "read-only", errno.EACCES: "permission denied",
                 errno.EPERM: "permission denied"}
        if getattr(errno, "EDQUOT", None) is not None:
            fatal[errno.EDQUOT] = "quota exceeded"
        if e.errno in fatal:
            return Fault(False, fatal[e.errno], reason)
        if e.errno in TRANSIENT_ERRNO:
            return Fault(True, "connection", reason)
    if isinstance(e, PermissionError):
        return Fault(False, "permission denied", one_line(e))
    if isinstance(e, _connection_types()):
        return Fault(True, "connection", one_line(f"{type(e).__name__}: {e}"))
    match = CODE_IN_TEXT.search(str(e))
    if match:
        code = match.group(1)
        if code in MISSING_BUCKET_CODES:
            return Fault(False, "no such bucket", one_line(e))
        if code in PERMISSION_CODES:
            return Fault(False, "permission denied", one_line(e))
        if code in TRANSIENT_CODES:
            return Fault(True, "throttled or unavailable", one_line(e))
    return None


def classify(err: BaseException) -> Fault | None:
    """The storage fault behind ``err`` (looking through its cause chain), or None when it is not one that
    distattr recognises. A fatal link anywhere in the chain wins over a transient one, and an S3 error code over
    the Python error s3fs made of it."""
    found = [(f, _client_error(e) is not None) for e in _chain(err) if (f := _classify_one(e)) is not None]
    if not found:
        return None
    # fatal first; then the storage's own answer (an S3 code) over its translation (s3fs's PermissionError...)
    found.sort(key=lambda item: (item[0].transient, not item[1]))
    return found[0][0]


def retrying(fn: Callable[..., T], *args, what: str, attempts: int = 6, base_delay: float = 0.5,
             max_delay: float = 15.0, counter: RetryCount | None = None, **kwargs) -> T:
    """``fn(*args, **kwargs)``, retried on transient storage faults.

    Waits ``min(max_delay, base_delay * 2**k) * U(0.5, 1)`` before retry ``k + 1``; after ``attempts`` tries the
    last transient error is raised unchanged. A fatal fault (disk full, quota, read-only, permission denied, no such
    bucket) raises :class:`StorageFatal` at once, with one line naming ``what`` (the store URL and the operation).
    Errors :func:`classify` does not recognise are raised unchanged. ``counter`` (optional) counts the retries."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except StorageFatal:
            raise
        except Exception as err:
            fault = classify(err)
            if fault is None:
                raise
            if not fault.transient:
                raise StorageFatal(fault.message(what)) from err
            if attempt == attempts - 1:
                raise
            if counter is not None:
                counter.retries += 1
                counter.last_error = one_line(f"{what}: {fault.detail}")
            time.sleep(min(max_delay, base_delay * 2**attempt) * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")
