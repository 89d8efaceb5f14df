"""What readers may trust in a store: done markers and unit part counts, per-example failures, stored targets of
split examples, the driver's lease, and storage faults (retried throttling, fatal disk-full and access errors)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import zarr

from distattr.results import SequenceAttribution
from distattr.statistics import chunks, summaries
from distattr.store import StorageFatal, StoreBusy, StoreError, faults, lease, open_store
from distattr.store import io as store_io
from distattr.store.faults import RetryCount
from distattr.store.io import SlotFailure, SlotResult
from distattr.store.layout import VERSION, Schema

BUCKET = "distattr-test"


# ---------------------------------------------------------------- small stores written by hand


def make_schema(n_units: int = 3, unit_size: int = 2, max_steps: int = 4, steps_chunk: int = 2,
                max_source: int = 4, max_target: int = 8) -> Schema:
    return Schema(n_units=n_units, unit_size=unit_size, max_source=max_source, max_target=max_target,
                  max_steps=max_steps, steps_chunk=steps_chunk, source_attributions=False, target_attributions=True,
                  step_scores=("probability",))


def make_seq(index: int, n_source: int = 3, steps: int = 2, columns: tuple[int, int] | None = None
             ) -> SequenceAttribution:
    """Example ``index``: ``n_source`` prompt tokens, ``steps`` generated ones; values depend on the index only.
    ``columns`` keeps a column range of the attribution (a part of a split example)."""
    n_target = n_source + steps
    rng = np.random.default_rng(index)
    values = rng.normal(size=(n_target, steps)).astype(np.float32)
    scores = rng.uniform(size=steps).astype(np.float32)
    c0, c1 = columns or (0, steps)
    ids = tuple(int(x) for x in 10 * index + np.arange(n_target))
    return SequenceAttribution(
        source_tokens=tuple(f"t{i}" for i in ids[:n_source]), target_tokens=tuple(f"t{i}" for i in ids),
        source_ids=ids[:n_source], target_ids=ids, source_attributions=None,
        target_attributions=values[:, c0:c1], step_scores={"probability": scores[c0:c1]},
        attr_pos_start=n_source + c0, attr_pos_end=n_source + c1)


def make_result(slot: int, index: int, steps: int = 2, columns: tuple[int, int] | None = None) -> SlotResult:
    seq = make_seq(index, steps=steps, columns=columns)
    return SlotResult(slot=slot, index=index, example_id=f"ex-{index}", meta={"text": f"example {index}"}, seq=seq,
                      attr_pos=(3, 3 + steps), column=(columns or (0, 0))[0])


def new_store(url: str, schema: Schema, n_examples: int, unit_parts, storage_options: dict | None = None,
              overwrite: bool = False):
    identity = {"model": "hand", "method": "hand", "n_examples": n_examples}
    return store_io.create(url, schema, identity, {"model": {}}, storage_options, overwrite=overwrite,
                           unit_parts=unit_parts)


def write_unit(group, schema: Schema, unit: int, indices: list[int]) -> None:
    results = [make_result(j, i) for j, i in enumerate(indices)]
    store_io.write_part(group, schema, unit, 0, 1, results)


@pytest.fixture
def crashed(tmp_path):
    """A store of 5 examples in 3 units of 2 slots: units 0 and 1 complete; unit 2 (example 4) has its slot arrays
    and values written but no done marker (a crash between the data and the marker)."""
    schema = make_schema()
    url = str(tmp_path / "crashed.zarr")
    group = new_store(url, schema, 5, [1, 1, 1])
    write_unit(group, schema, 0, [0, 1])
    write_unit(group, schema, 1, [2, 3])
    write_unit(group, schema, 2, [4])
    group["done"][2, 0] = 0  # the marker never made it (zarr deletes a chunk rewritten to its fill value)
    return url, schema


def test_unit_without_its_done_marker_is_absent_for_every_reader(crashed):
    url, schema = crashed
    group = zarr.open_group(url, mode="r")
    assert group["example_index"][4] == 4  # the data is there...
    assert store_io.done_units(group, schema).tolist() == [True, True, False]  # ...but the unit is not done
    assert store_io.valid_slots(group, schema).tolist() == [True, True, True, True, False, False]
    store = open_store(url)
    assert store.slot(4) == -1 and store.slot(3) == 3
    with pytest.raises(KeyError, match="example 4 is not written .* yet"):
        store[4]
    with pytest.raises(KeyError, match="no example with id 'ex-4'"):
        store.get("ex-4")
    assert [out.info["example_index"] for out in store] == [0, 1, 2, 3]
    ds = store.to_xarray()
    assert ds.sizes["example"] == 4 and ds.example_index.values.tolist() == [0, 1, 2, 3]
    assert "done" not in ds and "unit_parts" not in ds and "part_error" not in ds
    assert store.to_xarray(examples_only=False).sizes["slot"] == 6
    assert chunks.selection(store).sum() == 4
    table = summaries.summarize(store)
    assert table.example_index.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(store[3].sequences[0].target_attributions, make_seq(3).target_attributions)


def split_store(url: str):
    """A store of two units: unit 0 (one part) written whole, unit 1 (two parts) with only part 0 written."""
    schema = make_schema(n_units=2, unit_size=1)
    group = new_store(url, schema, 2, [1, 2])
    write_unit(group, schema, 0, [0])
    store_io.write_part(group, schema, 1, 0, 2, [make_result(0, 1, steps=4, columns=(0, 2))])
    return schema, group


def test_split_unit_counts_only_when_all_its_parts_are_done(tmp_path):
    url = str(tmp_path / "split.zarr")
    schema, group = split_store(url)
    assert store_io.done_cells(group, schema) == {(0, 0), (1, 0)}
    assert store_io.done_units(group, schema).tolist() == [True, False]
    store = open_store(url)
    assert [out.info["example_index"] for out in store] == [0]
    with pytest.raises(KeyError, match="not written"):
        store[1]
    assert chunks.selection(store).tolist() == [True, False]
    assert store.to_xarray().sizes["example"] == 1

    store_io.write_part(group, schema, 1, 1, 2, [make_result(0, 1, steps=4, columns=(2, 4))])
    store = open_store(url)
    got = store[1].sequences[0]
    np.testing.assert_array_equal(got.target_attributions, make_seq(1, steps=4).target_attributions)
    np.testing.assert_array_equal(got.step_scores["probability"], make_seq(1, steps=4).step_scores["probability"])


def test_unit_parts_must_fit_the_schema(tmp_path):
    schema = make_schema(n_units=2)
    with pytest.raises(ValueError, match="unit_parts"):
        new_store(str(tmp_path / "a.zarr"), schema, 2, [1, 3])  # 4 steps in chunks of 2: at most 2 parts
    with pytest.raises(ValueError, match="unit_parts"):
        new_store(str(tmp_path / "b.zarr"), schema, 2, [1])


def test_failed_examples_are_listed_and_raise_with_their_message(tmp_path):
    schema = make_schema(n_units=2)
    url = str(tmp_path / "failed.zarr")
    group = new_store(url, schema, 4, [1, 1])
    failure = SlotFailure(slot=1, index=1, example_id="ex-1", meta={"text": "too long"},
                          error="CUDA out of memory\nTried to allocate 2 GiB", source_ids=(5, 6, 7, 8, 9, 10))
    store_io.write_part(group, schema, 0, 0, 1, [make_result(0, 0)], [failure])
    write_unit(group, schema, 1, [2, 3])
    assert group["status"][:].tolist() == [1, 2, 1, 1]
    assert group["error"][1] == "CUDA out of memory Tried to allocate 2 GiB"  # one line
    assert group["n_source"][1] == 4 and np.isnan(group["target_attributions"][1]).all()  # cut to the bounds
    expected = [(1, "ex-1", "CUDA out of memory Tried to allocate 2 GiB")]
    assert store_io.failures(group, schema) == expected
    store = open_store(url)
    assert store.failures == expected
    with pytest.raises(KeyError, match=r"example 1 \(ex-1\) failed: CUDA out of memory"):
        store[1]
    with pytest.raises(KeyError, match="failed: CUDA"):
        store.get("ex-1")
    assert store.slot(1) == -1
    assert [out.info["example_id"] for out in store] == ["ex-0", "ex-2", "ex-3"]
    assert store.to_xarray().example_index.values.tolist() == [0, 2, 3]
    with_failed = store.to_xarray(include_failed=True)
    assert with_failed.example_index.values.tolist() == [0, 1, 2, 3]
    assert with_failed.status.values.tolist() == [1, 2, 1, 1]
    assert chunks.selection(store).tolist() == [True, False, True, True]
    with pytest.raises(ValueError, match="write_part_failure"):
        store_io.write_part(group, schema, 1, 1, 2, [], [failure])


def test_failed_later_part_fails_the_split_example(tmp_path):
    url = str(tmp_path / "part-failed.zarr")
    schema, group = split_store(url)
    store_io.write_part_failure(group, schema, 1, 1, "gradient was NaN\nat step 3")
    assert store_io.done_units(group, schema).tolist() == [True, True]
    assert store_io.failures(group, schema) == [(1, "ex-1", "gradient was NaN at step 3")]
    store = open_store(url)
    with pytest.raises(KeyError, match="failed: gradient was NaN at step 3"):
        store[1]
    assert chunks.selection(store).tolist() == [True, False]
    with pytest.raises(ValueError, match="part 0 records failures"):
        store_io.write_part_failure(group, schema, 1, 0, "no")
    # the part succeeds when retried: its message goes and the example is a result again
    store_io.write_part(group, schema, 1, 1, 2, [make_result(0, 1, steps=4, columns=(2, 4))])
    assert store_io.failures(group, schema) == []
    assert open_store(url)[1].info["example_id"] == "ex-1"


def _fail_writes_to(monkeypatch, name: str):
    """Make every write to array ``name`` raise, as a crash there would stop the writer."""
    original = zarr.Array.__setitem__

    def setitem(self, selection, value):
        if self.basename == name:
            raise KeyboardInterrupt(f"crash while writing {name}")
        return original(self, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", setitem)


def test_stored_targets_are_complete_once_n_target_is_set(tmp_path, monkeypatch):
    schema = make_schema(n_units=2, unit_size=1)
    group = new_store(str(tmp_path / "targets.zarr"), schema, 2, [1, 2])
    first = make_result(0, 1, steps=4, columns=(0, 0))
    assert store_io.stored_targets(group, schema, 1) is None
    with monkeypatch.context() as patch:
        _fail_writes_to(patch, "n_target")
        with pytest.raises(KeyboardInterrupt):
            store_io.write_targets(group, schema, 1, first)
    assert group["target_ids"][1, 0] == 10  # the ids are written, but without n_target they do not count
    assert store_io.stored_targets(group, schema, 1) is None
    store_io.write_targets(group, schema, 1, first)
    assert store_io.stored_targets(group, schema, 1) == list(first.seq.target_ids)
    assert store_io.done_cells(group, schema) == set()  # storing targets marks nothing done
    with monkeypatch.context() as patch:  # write_part writes n_target after target_ids too
        _fail_writes_to(patch, "n_target")
        with pytest.raises(KeyboardInterrupt):
            store_io.write_part(group, schema, 0, 0, 1, [make_result(0, 0)])
    assert group["target_ids"][0, 0] == 0 and store_io.stored_targets(group, schema, 0) is None


def test_save_outputs_and_synthetic_stores_are_complete(tmp_path):
    from distattr.statistics.synthetic import write_synthetic_store

    syn = write_synthetic_store(str(tmp_path / "syn.zarr"), 40, unit_size=8, steps=4, prompt=(2, 5))
    store = open_store(syn.url)
    assert store.attrs["version"] == VERSION and store.valid_slots.sum() == 40 and store.failures == []
    assert store.group["unit_parts"][:].tolist() == [1] * 5


# ---------------------------------------------------------------- the lease


def _write_lease(url: str, storage_options: dict | None = None, **fields) -> None:
    import fsspec

    now = datetime.now(UTC)
    record = {"host": "elsewhere", "pid": 1, "started": now.isoformat(), "heartbeat": now.isoformat(),
              "token": "theirs", **fields}
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/lease.json", json.dumps(record).encode())


def _two_drivers(url: str, storage_options: dict | None = None) -> None:
    first = lease.acquire(url, storage_options)
    assert first.took_over is None
    with pytest.raises(StoreBusy) as busy:
        lease.acquire(url, storage_options)
    message = str(busy.value)
    assert "\n" not in message and f"pid {os.getpid()}" in message and first.started in message
    assert "last heartbeat 0 s ago" in message or "last heartbeat 1 s ago" in message
    with pytest.raises(StoreBusy):
        lease.check_free(url, storage_options)
    before = lease.holder(url, storage_options)["heartbeat"]
    time.sleep(0.01)
    first.refresh()
    assert lease.holder(url, storage_options)["heartbeat"] > before
    first.release()
    assert lease.holder(url, storage_options) is None
    lease.check_free(url, storage_options)
    second = lease.acquire(url, storage_options)
    assert second.took_over is None and second.token != first.token
    second.release()


def test_a_second_driver_is_refused_while_the_first_holds_the_lease(tmp_path):
    _two_drivers(str(tmp_path / "held.zarr"))


def test_a_second_driver_is_refused_on_s3(s3_server):
    _two_drivers(f"s3://{BUCKET}/held.zarr", s3_server)


def test_stale_leases_are_taken_over(tmp_path):
    import socket

    url = str(tmp_path / "stale.zarr")
    old = (datetime.now(UTC) - timedelta(minutes=10)).isoformat()
    _write_lease(url, heartbeat=old)
    lease.check_free(url)  # a stale lease does not block --new-store
    taken = lease.acquire(url, stale_after_s=120)
    assert "host elsewhere, pid 1" in taken.took_over and "heartbeat is 600 s old" in taken.took_over
    with pytest.raises(StoreBusy, match="taken over by"):  # the old driver comes back: it must stop
        lease.Lease(url, None, "elsewhere", 1, old, "theirs").refresh()
    taken.release()

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    _write_lease(url, host=socket.gethostname(), pid=pid)  # fresh heartbeat, but its process is gone
    taken = lease.acquire(url)
    assert f"its process {pid} on this host is gone" in taken.took_over
    taken.release()

    _write_lease(url)  # alive elsewhere: only force takes it
    with pytest.raises(StoreBusy, match="host elsewhere, pid 1"):
        lease.acquire(url)
    forced = lease.acquire(url, force_new=True)
    assert "taken over by force" in forced.took_over
    forced.release()


def test_a_lease_at_the_root_confuses_neither_zarr_nor_xarray(tmp_path):
    schema = make_schema(n_units=1)
    url = str(tmp_path / "leased.zarr")
    group = new_store(url, schema, 2, [1])
    write_unit(group, schema, 0, [0, 1])
    held = lease.acquire(url)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # distattr's readers neither fail nor warn
        store = open_store(url)
        assert store[1].info["example_id"] == "ex-1"
        assert store.to_xarray().sizes["example"] == 2
    assert "lease.json" not in list(zarr.open_group(url, mode="r").array_keys())  # zarr itself ignores it
    held.release()
    _write_lease(url, heartbeat="2000-01-01T00:00:00+00:00")  # a stale lease left behind; --new-store replaces
    lease.check_free(url)
    new_store(url, schema, 2, [1], overwrite=True)
    assert open_store(url).valid_slots.sum() == 0
    lease.acquire(url).release()


# ---------------------------------------------------------------- storage faults


def test_retrying_counts_transient_faults_and_stops_at_fatal_ones():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(104, "Connection reset by peer")
        return "ok"

    counter = RetryCount()
    assert faults.retrying(flaky, what="s3://b/run.zarr", base_delay=0.001, counter=counter) == "ok"
    assert counter.retries == 2 and "Connection reset" in counter.last_error

    calls.clear()

    def full():
        calls.append(1)
        raise OSError(28, "No space left on device")

    with pytest.raises(StorageFatal) as fatal:
        faults.retrying(full, what="/data/run.zarr", base_delay=0.001)
    assert len(calls) == 1
    assert str(fatal.value) == ("the store's disk is full (No space left on device) at /data/run.zarr: free space, "
                                "then rerun the same command to resume")
    with pytest.raises(StorageFatal, match="read-only"):
        faults.retrying(lambda: (_ for _ in ()).throw(OSError(30, "Read-only file system")), what="x")
    with pytest.raises(ZeroDivisionError):  # unknown errors are not storage faults: raised unchanged
        faults.retrying(lambda: 1 / 0, what="x")


def test_classify_reads_s3_errors_as_s3fs_translates_them():
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    def s3(code: str, status: int) -> BaseException:
        error = ClientError({"Error": {"Code": code, "Message": f"{code} message"},
                             "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
        return translate_boto_error(error)

    assert faults.classify(s3("SlowDown", 503)).transient
    assert faults.classify(s3("InternalError", 500)).transient
    assert faults.classify(OSError(5, "An error occurred (ServiceUnavailable) when calling PutObject")).transient
    denied = faults.classify(s3("AccessDenied", 403))
    assert not denied.transient and denied.kind == "permission denied"
    assert faults.classify(s3("InvalidAccessKeyId", 403)).kind == "permission denied"
    assert faults.classify(s3("NoSuchBucket", 404)).kind == "no such bucket"
    assert faults.classify(KeyError("x")) is None


class FaultProxy:
    """A reverse proxy on 127.0.0.1 in front of an S3 server that answers ``status`` with an S3 XML error ``code``
    to the next ``burst`` PUT requests of chunk keys (``/c/`` in the path), then lets everything through."""

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        self.lock = threading.Lock()
        self.burst, self.status, self.code = 0, 503, "SlowDown"
        self.injected = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    data = b""
                    while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self):
                body = self._body()
                if proxy.take(self.command, self.path):
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{proxy.code}</Code>'
                           f"<Message>injected {proxy.code}</Message><RequestId>1</RequestId></Error>").encode()
                    self.send_response(proxy.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    self.wfile.write(xml)
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "content-length", "connection")}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                finally:
                    conn.close()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() in ("transfer-encoding", "connection", "content-length"):
                        continue
                    self.send_header(key, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def take(self, method: str, path: str) -> bool:
        with self.lock:
            if method == "PUT" and "/c/" in path and self.burst > 0:
                self.burst -= 1
                self.injected += 1
                return True
            return False

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# botocore and s3fs retry throttling themselves (2 botocore attempts here, to keep the test short, times s3fs's 5):
# a burst longer than their 10 tries in a row reaches distattr's own retries.
INNER_TRIES = 2 * 5


@pytest.fixture
def proxied(s3_server):
    proxy = FaultProxy(s3_server["endpoint_url"])
    options = {**s3_server, "endpoint_url": proxy.url,
               "config_kwargs": {"retries": {"total_max_attempts": 2, "mode": "standard"}}}
    try:
        yield proxy, options
    finally:
        proxy.close()


def test_throttling_longer_than_the_clients_retries_is_retried(proxied):
    proxy, options = proxied
    schema = make_schema(n_units=2)
    url = f"s3://{BUCKET}/throttled.zarr"
    new_store(url, schema, 4, [1, 1], options)
    group = store_io.open_group(url, "r+", options)
    proxy.burst = INNER_TRIES + 2
    counter = RetryCount()
    store_io.write_part(group, schema, 0, 0, 1, [make_result(0, 0), make_result(1, 1)], counter=counter)
    assert proxy.injected == INNER_TRIES + 2 and proxy.burst == 0
    assert counter.retries >= 1 and "SlowDown" in counter.last_error
    write_unit(group, schema, 1, [2, 3])
    store = open_store(url, storage_options=options)
    for i in range(4):
        got, expected = store[i].sequences[0], make_seq(i)
        assert got.target_ids == expected.target_ids
        np.testing.assert_array_equal(got.target_attributions, expected.target_attributions)


def test_access_denied_is_fatal_at_once(proxied):
    proxy, options = proxied
    schema = make_schema(n_units=1)
    url = f"s3://{BUCKET}/denied.zarr"
    new_store(url, schema, 2, [1], options)
    group = store_io.open_group(url, "r+", options)
    proxy.status, proxy.code, proxy.burst = 403, "AccessDenied", 1000
    counter = RetryCount()
    start = time.monotonic()
    with pytest.raises(StorageFatal) as fatal:
        store_io.write_part(group, schema, 0, 0, 1, [make_result(0, 0)], counter=counter)
    message = str(fatal.value)
    assert "\n" not in message and message.startswith("permission denied on the store (AccessDenied")
    assert f"s3://{BUCKET}/denied.zarr" in message and "rerun the same command to resume" in message
    assert counter.retries == 0 and proxy.injected <= 2 and time.monotonic() - start < 10


def test_full_disk_is_fatal_with_one_clear_line(small_disk):
    disk = small_disk("1m")
    schema = make_schema(n_units=64, unit_size=1, max_steps=128, steps_chunk=128, max_source=4, max_target=132)
    url = str(disk / "full.zarr")
    group = new_store(url, schema, 64, [1] * 64)
    rng = np.random.default_rng(0)
    with pytest.raises(StorageFatal) as fatal:
        for unit in range(64):  # 64 KiB of incompressible values per unit: the disk fills after ~15
            seq = SequenceAttribution(
                source_tokens=("a",) * 4, target_tokens=("a",) * 132, source_ids=(1,) * 4, target_ids=(1,) * 132,
                source_attributions=None, target_attributions=rng.normal(size=(132, 128)).astype(np.float32),
                step_scores={"probability": rng.uniform(size=128).astype(np.float32)}, attr_pos_start=4,
                attr_pos_end=132)
            result = SlotResult(slot=0, index=unit, example_id=str(unit), meta={}, seq=seq, attr_pos=(4, 132),
                                column=0)
            store_io.write_part(group, schema, unit, 0, 1, [result])
    message = str(fatal.value)
    assert "\n" not in message and message.startswith("the store's disk is full (No space left on device) at ")
    assert url in message and message.endswith("free space, then rerun the same command to resume")
    assert 0 < unit < 63


def test_create_with_overwrite_replaces_only_a_distattr_store(tmp_path):
    schema = make_schema(n_units=1)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="overwrite=True replaces only a distattr store"):
        store_io.create(str(other), schema, {"n_examples": 1}, {}, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    url = str(tmp_path / "store.zarr")
    new_store(url, schema, 2, [1])
    store_io.create(url, schema, {"n_examples": 2, "again": True}, {}, overwrite=True)
    assert store_io.read_header(url)["identity"]["again"] is True
