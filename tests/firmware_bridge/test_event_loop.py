"""firmware_bridge.event_loop: uvloop by default, asyncio's loop on request or without uvloop."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest
import uvloop

from firmware_bridge import event_loop
from tests.harness.loops import BOTH_LOOPS


async def _name_and_type() -> tuple[str, type]:
    return event_loop.running_loop_name(), type(asyncio.get_running_loop())


def test_uvloop_is_the_default(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    assert event_loop.loop_factory({}) == ("uvloop", uvloop.new_event_loop)
    assert event_loop.loop_factory({"EDGEGW_EVENT_LOOP": " UVLOOP "})[0] == "uvloop"
    name, loop_type = event_loop.run(_name_and_type(), env={})
    assert name == "uvloop" and issubclass(loop_type, uvloop.Loop)
    assert caplog.records == []


def test_asyncio_on_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    env = {"EDGEGW_EVENT_LOOP": "asyncio"}
    assert event_loop.loop_factory(env) == ("asyncio", None)
    name, loop_type = event_loop.run(_name_and_type(), env=env)
    assert name == "asyncio" and issubclass(loop_type, asyncio.BaseEventLoop)
    assert not issubclass(loop_type, uvloop.Loop)
    assert caplog.records == []


def test_an_unknown_value_is_one_warning_and_the_default(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    assert event_loop.loop_factory({"EDGEGW_EVENT_LOOP": "trio"})[0] == "uvloop"
    assert [r.getMessage() for r in caplog.records] == [
        "EDGEGW_EVENT_LOOP=trio: not one of uvloop, asyncio; running on uvloop"
    ]


def test_without_uvloop_asyncio_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert event_loop.run(_name_and_type(), env={})[0] == "asyncio"
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith(
        "event loop: uvloop cannot be imported (")
    assert caplog.records[0].getMessage().endswith("); running on asyncio's loop")


def test_run_returns_the_coroutines_value_and_raises_its_exception() -> None:
    async def fails() -> None:
        raise OSError("no such device")

    assert event_loop.run(asyncio.sleep(0, result=7), env={}) == 7
    with pytest.raises(OSError, match="no such device"):
        event_loop.run(fails(), env={})


@BOTH_LOOPS
async def test_both_loops_tests_run_on_each_loop(request: pytest.FixtureRequest) -> None:
    """The marker the transports' tests use really puts them on each loop."""
    name = event_loop.running_loop_name()
    assert request.node.name.endswith(f"[{name}]")
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop) == (name == "uvloop")
