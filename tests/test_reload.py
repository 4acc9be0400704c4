"""Hot reload as a fleet tool does it: files renamed into place, drop-ins, SIGHUP; a bad edit
keeps the running settings and says why in the status."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from support import AgentProcess, Broker, Client, ask, build_model

EFFECT_TIMEOUT_S = 20


def until(check: Callable[[], bool], what: str) -> float:
    """Seconds until `check()` holds (polled), failing after EFFECT_TIMEOUT_S."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < EFFECT_TIMEOUT_S, f"never: {what}"
        time.sleep(0.05)
    return time.monotonic() - started


def status_of(client: Client, agent: AgentProcess) -> dict[str, Any]:
    return client.wait_for(lambda d: d.get("device_id") == agent.device_id and "state" in d, 10)


@pytest.fixture
def agent(broker: Broker, client: Client, start_agent: Callable[..., AgentProcess]) -> AgentProcess:
    started = start_agent(broker, client, reload_debounce_s=0.2, limits__max_prompt_chars=1000)
    client.subscribe(started.response_topic)
    return started


def prompt_refused(client: Client, agent: AgentProcess) -> bool:
    doc = ask(client, agent, {"prompt": "x" * 50, "max_tokens": 1})
    return not doc["ok"] and doc["error"]["code"] == "too_large"


def test_renamed_file_applies_a_live_limit(client: Client, agent: AgentProcess) -> None:
    assert not prompt_refused(client, agent)
    edited = time.monotonic()
    agent.rewrite(limits__max_prompt_chars=20)
    seconds = until(lambda: prompt_refused(client, agent), "the new limit")
    print(f"\nconfig edit to effect: {seconds * 1000:.0f} ms (debounce 200 ms)")
    assert time.monotonic() - edited < EFFECT_TIMEOUT_S
    applied = [line for line in agent.log_lines() if line["event"] == "config.applied"]
    assert applied and applied[-1]["parts"] == ["live"]


def test_dropin_file_is_merged_and_applied(client: Client, agent: AgentProcess) -> None:
    dropins = agent.config.parent / "conf.d"
    dropins.mkdir()
    temp = dropins / ".50-site.toml.tmp"
    temp.write_text("[limits]\nmax_prompt_chars = 20\n")
    temp.rename(dropins / "50-site.toml")
    until(lambda: prompt_refused(client, agent), "the drop-in")


def test_invalid_edit_keeps_running_settings_and_says_why(client: Client, agent: AgentProcess) -> None:
    agent.rewrite(limits__max_prompt_chars=20, limits__colour="red")
    until(lambda: any(line["event"] == "config.rejected" for line in agent.log_lines()), "rejection")
    status = client.wait_for(lambda d: d.get("device_id") == agent.device_id and d.get("config_error"), 10)
    assert status["state"] == "ready"
    assert status["config_error"] == [f"{agent.config}: limits.colour: unknown key"]
    assert not prompt_refused(client, agent)  # the old limit (1000) is still the one in force
    del agent.data["limits"]["colour"]
    agent.rewrite()
    fixed = client.wait_for(lambda d: d.get("device_id") == agent.device_id and "config_error" in d
                            and d["config_error"] is None, EFFECT_TIMEOUT_S)
    assert fixed["state"] == "ready"
    assert prompt_refused(client, agent)


def test_sighup_reloads_at_once(broker: Broker, client: Client,
                                start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent(broker, client, reload_debounce_s=60, limits__max_prompt_chars=1000)
    client.subscribe(agent.response_topic)
    agent.rewrite(limits__max_prompt_chars=20)
    time.sleep(0.5)
    assert not prompt_refused(client, agent)  # the watcher is still waiting out its 60 s
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    until(lambda: prompt_refused(client, agent), "SIGHUP reload")


def test_model_change_loads_the_new_one_and_keeps_answering(client: Client, agent: AgentProcess) -> None:
    vision = build_model("tiny-vision")
    agent.rewrite(model__path=str(vision))
    status = client.wait_for(lambda d: d.get("device_id") == agent.device_id
                             and d.get("model") == vision.name, EFFECT_TIMEOUT_S)
    assert status["state"] == "ready" and status["config_error"] is None
    doc = ask(client, agent, {"prompt": "hi", "max_tokens": 2})
    assert doc["ok"] and doc["model"] == vision.name


def test_bad_model_path_is_rejected_and_the_old_model_stays(client: Client, agent: AgentProcess,
                                                            tmp_path: Path) -> None:
    agent.rewrite(model__path=str(tmp_path / "nothing-here"))
    status = client.wait_for(lambda d: d.get("device_id") == agent.device_id and d.get("config_error"),
                             EFFECT_TIMEOUT_S)
    assert "is not a model folder" in status["config_error"][0]
    assert ask(client, agent, {"prompt": "hi", "max_tokens": 2})["ok"]


def test_broker_change_reconnects_to_the_new_one(broker: Broker, client: Client, agent: AgentProcess) -> None:
    other = Broker()
    other.start()
    try:
        watcher = Client(other.port)
        watcher.subscribe(agent.status_topic)
        agent.rewrite(mqtt__port=other.port)
        watcher.wait_for(lambda d: d.get("device_id") == agent.device_id and d.get("state") == "ready",
                         EFFECT_TIMEOUT_S)
        watcher.subscribe(agent.response_topic)
        assert ask(watcher, agent, {"prompt": "hi", "max_tokens": 2})["ok"]
        watcher.close()
        left = Client(broker.port)
        try:  # the old broker was told the agent left it: its retained status says offline
            left.subscribe(agent.status_topic)
            assert status_of(left, agent)["state"] == "offline"
        finally:
            left.close()
    finally:
        other.close()


def test_camera_added_by_dropin_appears_in_status(client: Client, agent: AgentProcess,
                                                  tmp_path: Path) -> None:
    from video import make_clip
    clip = make_clip(tmp_path / "yard.mp4")
    dropins = agent.config.parent / "conf.d"
    dropins.mkdir(exist_ok=True)
    (dropins / "60-cameras.toml").write_text(f'[cameras.yard]\nsource = "{clip}"\n')
    status = client.wait_for(lambda d: d.get("device_id") == agent.device_id
                             and "yard" in (d.get("cameras") or {}), EFFECT_TIMEOUT_S)
    assert status["cameras"]["yard"]["state"] in ("starting", "streaming")


def test_a_changed_max_batch_applies_and_says_so(client: Client, agent: AgentProcess) -> None:
    """[inference] reloads the model beside the old one; the workers follow max_batch at once."""
    agent.rewrite(inference__max_batch=2, stream__interval_ms=0)
    until(lambda: any(line.get("event") == "config.applied" for line in agent.log_lines()), "the reload")
    client.subscribe(agent.status_topic)  # the retained status
    status = client.wait_for(lambda d: d.get("device_id") == agent.device_id and d.get("max_batch") == 2, 10)
    assert status["state"] == "ready"
    applied = [line for line in agent.log_lines() if line["event"] == "config.applied"]
    assert any("model" in line["parts"] for line in applied)
    assert ask(client, agent, {"prompt": "still there?", "max_tokens": 2})["ok"]


def test_reading_the_file_is_not_an_edit(tmp_path: Path) -> None:
    """One edit, one reload: the reload reads the file (watchdog reports opened and closed
    events for that), which must not set off another one."""
    from edge_agent.daemon.reload import ConfigWatcher

    main = tmp_path / "agent.toml"
    main.write_text("device_id = 'a'\n")
    calls: list[float] = []
    watcher = ConfigWatcher(main, 0.2, lambda: (calls.append(time.monotonic()), main.read_text()))
    watcher.start()
    try:
        time.sleep(0.3)
        main.write_text("device_id = 'b'\n")
        time.sleep(2.5)
    finally:
        watcher.stop()
    assert len(calls) == 1, calls


def test_a_queued_request_keeps_the_settings_it_was_accepted_under(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    """A reload is one snapshot swap: a request waiting in the queue when `model.max_new_tokens`
    goes from 40 to 3 runs with 40 (the settings it was accepted under); the next one with 3."""
    from faults import fault_hooks_env

    agent = start_agent(broker, client, reload_debounce_s=0.1, model__max_new_tokens=40,
                        inference__max_batch=1, inference__batching=False,
                        env=fault_hooks_env(tmp_path / "hooks"))
    client.subscribe(agent.response_topic)
    for n in range(3):  # each keeps the one worker a second: the queued request waits behind them
        client.publish(agent.request_topic, json.dumps({"id": f"slow-{n}", "prompt": "SLOW", "max_tokens": 1}))
    client.publish(agent.request_topic, json.dumps({"id": "queued", "prompt": "hello"}))
    time.sleep(0.3)
    agent.rewrite(model__max_new_tokens=3)
    queued = client.wait_for(lambda d: d.get("id") == "queued", 30)
    assert any(line["event"] == "config.applied" for line in agent.log_lines()), "the reload came too late"
    assert queued["ok"] and queued["usage"]["completion_tokens"] == 40, queued
    after = ask(client, agent, {"prompt": "hello"})
    assert after["ok"] and after["usage"]["completion_tokens"] == 3, after
