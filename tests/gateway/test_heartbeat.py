"""The heartbeat's assessment (pure) and its file (real files, this process)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import heartbeat
from gateway.heartbeat import Heartbeat, Phase, Process, Run, assess

NOW = 10_000_000


def hb(phase: Phase = Phase.RUNNING, updated_ms: int = NOW - 1000, **kw: object) -> Heartbeat:
    base: dict[str, object] = dict(
        pid=4242, proc_start=777, boot_id="boot-a", version="1.2.3", started_ms=NOW - 60_000,
        phase=phase, updated_ms=updated_ms, interval_s=5.0,
    )
    base.update(kw)
    return Heartbeat(**base)  # type: ignore[arg-type]


ALIVE = Process(True, 777)


def test_table() -> None:
    assert assess(None, Process(False), NOW, "boot-a").run is Run.NOT_RUNNING
    assert assess(hb(), ALIVE, NOW, "boot-a").run is Run.RUNNING
    assert assess(hb(Phase.STARTING), ALIVE, NOW, "boot-a").run is Run.STARTING
    assert assess(hb(Phase.STOPPING), ALIVE, NOW, "boot-a").run is Run.STOPPING
    stopped = assess(hb(Phase.STOPPED, detail="clean stop"), Process(False), NOW, "boot-a")
    assert stopped.run is Run.NOT_RUNNING and "clean stop" in stopped.detail
    gone = assess(hb(), Process(False), NOW, "boot-a")
    assert gone.run is Run.NOT_RUNNING and "crashed or killed" in gone.detail
    # the pid now belongs to another process (started at another time)
    assert assess(hb(), Process(True, 999), NOW, "boot-a").run is Run.NOT_RUNNING
    # a heartbeat from before a reboot (a /run that is not tmpfs)
    assert assess(hb(), ALIVE, NOW, "boot-b").run is Run.NOT_RUNNING
    late = assess(hb(updated_ms=NOW - 16_000), ALIVE, NOW, "boot-a")
    assert late.run is Run.NOT_RESPONDING and "16 s" in late.detail


@given(
    phase=st.sampled_from(list(Phase)),
    silent_ms=st.integers(0, 10**9),
    exists=st.booleans(),
    same_start=st.booleans(),
    same_boot=st.booleans(),
)
def test_running_only_when_everything_agrees(
    phase: Phase, silent_ms: int, exists: bool, same_start: bool, same_boot: bool
) -> None:
    a = assess(
        hb(phase, updated_ms=NOW - silent_ms),
        Process(exists, 777 if same_start else 778),
        NOW,
        "boot-a" if same_boot else "boot-b",
    )
    alive = exists and same_start and same_boot and phase is not Phase.STOPPED
    if not alive:
        assert a.run is Run.NOT_RUNNING
    elif silent_ms > 15_000:
        assert a.run is Run.NOT_RESPONDING
    else:
        assert a.run.value == phase.value


def test_writer_round_trip_and_a_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "heartbeat.json"
    w = heartbeat.Writer(path, version="9.9", started_ms=5)
    assert w.beat(100, phase=Phase.RUNNING, link="up", last_contact_ms=90) is None
    got = heartbeat.read(path)
    assert got is not None and got.pid == os.getpid() and got.phase is Phase.RUNNING
    assert got.proc_start == heartbeat.proc_start(os.getpid()) is not None
    assert assess(got, heartbeat.process(os.getpid()), 200, heartbeat.boot_id()).run is Run.RUNNING
    # no directory: said once per cause, not an exception, not repeated
    w2 = heartbeat.Writer(tmp_path / "absent" / "hb.json", version="9.9", started_ms=5)
    first = w2.beat(100)
    assert first is not None and "absent" in first
    assert w2.beat(200) is None


def test_a_file_that_is_not_a_heartbeat_is_named(tmp_path: Path) -> None:
    path = tmp_path / "heartbeat.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a heartbeat file"):
        heartbeat.read(path)
    path.write_text('{"pid": 1}')
    with pytest.raises(ValueError, match="not a heartbeat file"):
        heartbeat.read(path)


def test_where_the_heartbeat_goes(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    given = tmp_path / "hb.json"
    assert heartbeat.path_for(given, db, {}) == given
    assert heartbeat.path_for(None, db, {"RUNTIME_DIRECTORY": "/run/edgegw"}) == Path(
        "/run/edgegw/heartbeat.json"
    )
    beside = tmp_path / "gw.db.heartbeat"
    assert heartbeat.path_for(None, db, {}) == beside
    assert heartbeat.path_to_read(given, db) == given
    beside.write_text("{}")
    if not heartbeat.RUNTIME_PATH.exists():
        assert heartbeat.path_to_read(None, db) == beside
