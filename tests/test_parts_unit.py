"""Pure parts: back-off, status board, settings snapshot, log set-up."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from edge_agent import log
from edge_agent.health.status import StatusBoard
from edge_agent.backoff import backoff_delay
from edge_agent.settings.model import Settings


def test_backoff_grows_is_capped_and_jittered() -> None:
    delays = [backoff_delay(n, 1.0, 30.0) for n in range(12)]
    assert all(1.0 <= d <= 30.0 for d in delays)
    assert delays[0] <= 1.0 and max(delays[8:]) >= 15.0
    assert len({round(backoff_delay(10, 1.0, 30.0), 6) for _ in range(20)}) > 1


def test_status_board_tracks_since_only_on_change() -> None:
    board = StatusBoard("box")
    first = json.loads(board.set("ready", model="m", provider="cpu"))
    again = json.loads(board.set("ready"))
    assert first["since"] == again["since"] and again["model"] == "m"
    assert json.loads(board.offline_payload())["state"] == "offline"
    with pytest.raises(ValueError):
        board.set("sleeping")


def test_settings_are_immutable() -> None:
    settings = Settings(device_id="box")
    with pytest.raises(Exception):
        settings.device_id = "other"  # type: ignore[misc]
    assert settings.client_id == "edge-agent-box"


def test_json_logs_carry_bound_request_id() -> None:
    stream = io.StringIO()
    log.configure("info", "json", stream)
    with structlog.contextvars.bound_contextvars(request_id="r-1"):
        log.get_logger("t").info("request.done", ms=3)
    line = json.loads(stream.getvalue())
    assert line["event"] == "request.done" and line["request_id"] == "r-1" and line["level"] == "info"
