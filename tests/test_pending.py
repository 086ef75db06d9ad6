"""The pending records written behind ``.delay()``: soon, in batches, at exit, never lost quietly.

Against a real Redis: the producer's background writer, a producer process that exits right after
``.delay()``, a forked child, and the writer's own limits with a ``write`` standing in for Redis.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from typing import Any

import pytest
import redis
from conftest import APP_ID, make_event, wait_until, worker_env

from metrix_s2s import pending
from metrix_s2s.pending import MAX_BUFFERED, PendingWriter
from metrix_s2s.tasks import QUEUE


def test_a_delay_is_recorded_as_pending_soon_without_a_flush(
    producer: Any, redis_client: redis.Redis
) -> None:
    result = producer.delay(APP_ID, make_event())
    assert redis_client.llen(QUEUE) == 1
    assert wait_until(lambda: redis_client.zscore("metrix:pending", result.id) is not None, 5)
    assert redis_client.hget("metrix:pending:msg", result.id) is not None


def test_records_of_a_burst_are_written_in_few_script_calls_and_all_by_flush(
    producer: Any, redis_client: redis.Redis
) -> None:
    redis_client.config_resetstat()
    ids = [producer.delay(APP_ID, make_event(metrixUserId=f"u{i}")).id for i in range(200)]
    pending.flush()
    assert redis_client.zcard("metrix:pending") == 200
    assert set(redis_client.hkeys("metrix:pending:msg")) == {i.encode() for i in ids}
    calls = redis_client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    assert calls < 100, f"{calls} script calls for 200 pending records"


def test_a_producer_that_exits_right_after_delay_leaves_its_record(
    redis_url: str, redis_client: redis.Redis
) -> None:
    code = (
        "from metrix_s2s import send_metrix_event\n"
        "from conftest import APP_ID, make_event\n"
        "print(send_metrix_event.delay(APP_ID, make_event()).id)\n"
    )
    path = [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]
    env = worker_env(redis_url, "http://127.0.0.1:9") | {"PYTHONPATH": os.pathsep.join(path)}
    command = [sys.executable, "-c", code]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=True)
    event_id = out.stdout.strip().splitlines()[-1]
    # written at exit (atexit), not left in the dead process's memory
    assert redis_client.zscore("metrix:pending", event_id) is not None


def test_a_forked_child_starts_with_an_empty_writer_of_its_own() -> None:
    parent = pending._writer
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave at once
        ok = pending._writer is not parent and not pending._writer._buffer
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.close(read)
    os.waitpid(pid, 0)
    assert pending._writer is parent


def test_a_full_buffer_makes_the_caller_write_its_own_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    writers: list[str] = []

    def write(entries: dict[str, tuple[str, Any]]) -> None:
        writers.append(threading.current_thread().name)
        if threading.current_thread().name == "metrix-s2s-pending":
            release.wait(10)  # a slow Redis: the buffer fills up meanwhile

    monkeypatch.setattr(pending, "MAX_BUFFERED", 3)
    writer = PendingWriter(write)
    writer.add({"e0": ("A", {})})
    assert wait_until(lambda: writers == ["metrix-s2s-pending"], 5)
    for i in range(1, 4):
        writer.add({f"e{i}": ("A", {})})
    assert writers == ["metrix-s2s-pending"]  # buffered
    writer.add({"e4": ("A", {})})
    assert writers[-1] == threading.current_thread().name  # the caller wrote e4 itself
    release.set()
    writer.flush()
    assert MAX_BUFFERED > 1000  # the real bound


def test_a_redis_that_cannot_take_the_records_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def write(entries: dict[str, tuple[str, Any]]) -> None:
        raise redis.ConnectionError("Redis is down")

    writer = PendingWriter(write)
    with caplog.at_level(logging.WARNING, logger="metrix_s2s.tasks"):
        writer.add({"e1": ("A", {}), "e2": ("A", {})})
        writer.flush()
        assert wait_until(lambda: "not recorded as pending" in caplog.text, 5)
    assert "e1" in caplog.text
    assert "Redis is down" in caplog.text


class Killed(BaseException):
    """What ends a thread or greenlet from outside (not an ``Exception``)."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # on purpose
def test_a_writer_thread_that_was_ended_is_replaced_and_says_what_it_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    written: list[str] = []
    kill = threading.Event()
    kill.set()

    def write(entries: dict[str, tuple[str, Any]]) -> None:
        if kill.is_set():
            kill.clear()
            raise Killed
        written.extend(entries)

    writer = PendingWriter(write)
    with caplog.at_level(logging.WARNING, logger="metrix_s2s.tasks"):
        writer.add({"lost": ("A", {})})
        ended = writer._thread
        assert wait_until(lambda: "maybe not recorded as pending" in caplog.text, 5)
    assert "lost" in caplog.text
    # its exception reaches threading's hook within this test, where it is expected, not later
    # (None: it has already ended)
    if ended is not None:
        ended.join(timeout=5)
    writer.add({"next": ("A", {})})  # a new thread writes it
    assert wait_until(lambda: written == ["next"], 5)
    writer.flush(timeout_s=1)  # and nothing waits for the dead thread
