"""The model in a child process: real ORT GenAI in a real child, and the daemon around it.

Why the child (process.py): ORT GenAI keeps the GIL inside its calls, and ends its process on
some inputs. A crash now costs the one request (`internal`) and a reload, never the daemon; a
daemon killed with SIGKILL leaves no child behind."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from edge_agent.errors import AgentError, ErrorCode, ModelLoadError, Timeout, TooLarge
from edge_agent.inference import GenerationParams, LocalInference, Work
from edge_agent.inference.types import FINISH_CANCELLED
from faults import Pipeline, fault_hooks_env
from support import AgentProcess, Broker, Client

HELLO = ({"role": "user", "content": "Hello"},)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) counts as gone
    return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def engine(tiny_model: Path) -> Iterator[LocalInference]:
    loaded = LocalInference(tiny_model, "cpu")
    loaded.load()
    yield loaded
    loaded.close()


def test_generates_in_a_child_with_the_errors_of_the_engine(engine: LocalInference) -> None:
    assert engine.pid is not None and engine.pid != os.getpid() and alive(engine.pid)
    assert engine.provider == "cpu" and engine.context_length
    done = engine.generate(HELLO, GenerationParams(8))
    assert done.completion_tokens + (done.finish_reason == "stop") >= 1 and done.generate_ms > 0
    with pytest.raises(TooLarge):  # an AgentError raised in the child arrives as itself
        engine.generate(({"role": "user", "content": "word " * 5000},), GenerationParams(4))
    assert engine.generate(HELLO, GenerationParams(8)).text == done.text  # greedy: the same again


def test_a_dead_child_fails_every_request_in_flight_and_is_replaced(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three requests in the child (the first holds it for a second: a fault hook), the child is
    killed: all three fail `internal` at once, a new child answers the next."""
    for key, value in fault_hooks_env(tmp_path / "hooks").items():
        monkeypatch.setenv(key, value)
    engine = LocalInference(tiny_model, "cpu")
    engine.load()
    try:
        first = engine.pid
        assert first is not None
        handles = [engine.submit(Work(({"role": "user", "content": text},), GenerationParams(4)))
                   for text in ("SLOW one", "two", "three")]
        time.sleep(0.3)
        os.kill(first, signal.SIGKILL)
        for handle in handles:
            with pytest.raises(AgentError) as failed:
                handle.result()
            assert failed.value.code == ErrorCode.INTERNAL and "signal 9" in str(failed.value)
        assert engine.generate(HELLO, GenerationParams(4)).generate_ms > 0
        assert engine.pid not in (None, first) and engine.crashes == 1 and engine.in_flight == 0
    finally:
        engine.close()


RELOAD_S = 3.0


def test_a_cancel_never_waits_for_a_dead_child_to_be_replaced(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue: cancel runs on paho's network thread, and waited (behind the client's lock)
    for a new child to load the model after the last one died: seconds for Phi-3.5, with
    nothing read from the broker meanwhile. Here the replacement takes RELOAD_S to load (a
    fault hook); a cancel, and a request taken while the model loads and cancelled, are each
    over at once, and the request taken then is answered cancelled before it reaches a child."""
    for key, value in fault_hooks_env(tmp_path / "hooks").items():
        monkeypatch.setenv(key, value)
    engine = LocalInference(tiny_model, "cpu")
    engine.load()  # loads at full speed: the hook reads its delay when a child starts
    monkeypatch.setenv("FAULT_SLOW_LOAD_S", str(RELOAD_S))
    try:
        first = engine.pid
        assert first is not None
        handles = [engine.submit(Work(({"role": "user", "content": text},), GenerationParams(4)))
                   for text in ("SLOW one", "two")]
        time.sleep(0.3)
        killed = time.monotonic()
        os.kill(first, signal.SIGKILL)
        with pytest.raises(AgentError):
            handles[0].result()  # the death is seen; the model is loading again from here
        within(0.5, engine.cancel, handles[1].rid)
        taken = within(0.5, engine.submit, Work(HELLO, GenerationParams(4)))
        within(0.5, taken.cancel)
        assert taken.result().finish_reason == FINISH_CANCELLED
        assert engine.generate(HELLO, GenerationParams(4)).generate_ms > 0
        assert time.monotonic() - killed > RELOAD_S * 0.8  # the reload did take that long
        assert engine.pid not in (None, first) and engine.crashes == 1 and engine.in_flight == 0
    finally:
        engine.close()


def within(seconds: float, call: Callable[..., Any], *args: Any) -> Any:
    """`call(*args)` on another thread (as paho's would make it); fails the test unless it
    returns within `seconds`."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(call(*args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(call, '__name__', call)} waited more than {seconds} s"
    return out[0] if out else None


def test_a_generation_stuck_in_one_call_is_ended_with_its_process(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SLOW (a fault hook in the child) holds one call for a second: with no deadline of its own,
    the generation is stuck once past `longest_s` plus the grace; its process is ended, the
    request times out, and the next one runs on a new process."""
    for key, value in fault_hooks_env(tmp_path / "hooks").items():
        monkeypatch.setenv(key, value)
    engine = LocalInference(tiny_model, "cpu", longest_s=0.1, stuck_grace_s=0.2)
    engine.load()
    try:
        first = engine.pid
        started = time.monotonic()
        with pytest.raises(Timeout):
            engine.generate(({"role": "user", "content": "SLOW please"},), GenerationParams(4))
        assert time.monotonic() - started < 0.9  # not waited out: the hook sleeps 1 s
        assert first is not None and wait_gone(first, 5)
        assert engine.generate(HELLO, GenerationParams(4)).generate_ms > 0
        assert engine.pid not in (None, first)
    finally:
        engine.close()


def test_close_ends_the_child(tiny_model: Path) -> None:
    engine = LocalInference(tiny_model, "cpu")
    engine.load()
    pid = engine.pid
    assert pid is not None
    engine.close()
    assert wait_gone(pid, 5)
    with pytest.raises(Exception) as refused:
        engine.generate(HELLO, GenerationParams(4))
    assert getattr(refused.value, "code", None) == ErrorCode.UNAVAILABLE


def test_a_load_failure_is_a_model_load_error_and_leaves_no_child(tmp_path: Path, tiny_model: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "genai_config.json").write_text((tiny_model / "genai_config.json").read_text())
    engine = LocalInference(broken, "cpu", fallback=())
    with pytest.raises(ModelLoadError):
        engine.load()
    assert engine.pid is None


def test_a_crash_in_inference_is_answered_internal_and_the_daemon_goes_on(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    """CRASH prompts end the inference process (a fault hook, as ORT GenAI does on some
    inputs). One request at a time here (inference.max_batch = 1): each crash is answered
    `internal`; every other request, before and after, is answered; the daemon's pid and MQTT
    session stay the same. (Several in flight: test_concurrency.py.)"""
    agent = start_agent(broker, client, env=fault_hooks_env(tmp_path / "hooks"), limits__queue_size=32,
                        stats_interval_s=1.0, inference__max_batch=1)
    client.subscribe(f"{agent.prefix}/{agent.device_id}/stats")
    pipeline = Pipeline(broker.port, agent.request_topic, agent.response_topic)
    try:
        ids = [f"c{i}" for i in range(12)]
        crashing = {"c3", "c8"}
        for rid in ids:
            pipeline.send(rid, f"CRASH {rid}" if rid in crashing else f"fine {rid}")
        pipeline.wait_answers(60)
        pipeline.settle(0.5)
        for rid in ids:
            doc = pipeline.first_answer(rid)
            if rid in crashing:
                assert doc["ok"] is False and doc["error"]["code"] == "internal", doc
                assert "inference process died (exit status 3)" in doc["error"]["message"], doc
            else:
                assert doc["ok"] is True, doc
        assert pipeline.tally().answered == len(ids)
    finally:
        pipeline.close()
    started = [line["pid"] for line in agent.log_lines() if line.get("event") == "inference.process_started"]
    assert len(started) == 3 and len(set(started)) == 3  # the first, and one after each crash
    assert sum(1 for line in agent.log_lines() if line.get("event") == "inference.process_died") == 2
    assert agent.proc is not None and agent.proc.poll() is None
    assert sum(1 for line in agent.log_lines() if line.get("event") == "mqtt.connected") == 1
    assert client.wait_for(lambda d: d.get("inference_restarts") == 2, timeout=15)


def test_a_killed_daemon_leaves_no_inference_process(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent(broker, client)
    child = next(line["pid"] for line in agent.log_lines() if line.get("event") == "inference.process_started")
    assert alive(child)
    agent.stop(signal.SIGKILL)
    assert wait_gone(child, 5)


def test_a_stopped_daemon_ends_its_inference_process(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent(broker, client)
    child = next(line["pid"] for line in agent.log_lines() if line.get("event") == "inference.process_started")
    assert agent.stop(signal.SIGTERM) == 0
    assert not alive(child)  # ended before the daemon exited, not left to notice
