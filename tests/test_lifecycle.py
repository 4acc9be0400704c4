"""The daemon as systemd and an operator see it: readiness, overload, stop, broker restarts,
settings errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from faults import fault_hooks_env
from support import AgentProcess, Broker, Client, cuda_missing


def test_queue_full_answers_busy_at_once_and_loses_nothing(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    """One request runs (max_batch 1, SLOW: a second in the model), exactly queue_size wait,
    the next is answered busy at once; every accepted one is answered."""
    queue_size = 3
    agent = start_agent(broker, client, limits__queue_size=queue_size, inference__max_batch=1,
                        env=fault_hooks_env(tmp_path / "hooks"))
    client.subscribe(agent.response_topic)

    def send(rid: str, prompt: str = "hi") -> None:
        client.client.publish(agent.request_topic, json.dumps({"id": rid, "prompt": prompt, "max_tokens": 2}), qos=1)

    def accepted() -> dict[str, int]:
        return {line["request_id"]: line["queue_depth"] for line in agent.log_lines()
                if line.get("event") == "request.accepted"}

    send("running", "SLOW")
    deadline = time.monotonic() + 10
    while "running" not in accepted():
        assert time.monotonic() < deadline, "the first request was not accepted"
        time.sleep(0.02)
    time.sleep(0.2)  # the worker takes it at once; it stays a second in the model
    waiting = [f"waiting-{i}" for i in range(queue_size)]
    sent = time.monotonic()
    for rid in [*waiting, "one-too-many"]:
        send(rid)
    busy = client.wait_for(lambda d: "id" in d, 5)
    assert busy["id"] == "one-too-many" and time.monotonic() - sent < 0.9  # before "running" is done
    assert busy["error"]["code"] == "busy" and busy["error"]["retry_after_ms"] > 0
    assert f"queue full ({queue_size} waiting)" in busy["error"]["message"]
    answers = {}
    while len(answers) < queue_size + 1:
        doc = client.wait_for(lambda d: "id" in d)
        assert doc["id"] not in answers, "two answers for one request"
        answers[doc["id"]] = doc
    assert set(answers) == {"running", *waiting} and all(a["ok"] for a in answers.values())
    # Each waited behind the running one: the queue held 1, 2, ... queue_size.
    assert [accepted()[rid] for rid in waiting] == list(range(1, queue_size + 1))


def test_sigterm_finishes_the_running_request_and_publishes_offline(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent(broker, client)
    client.subscribe(agent.response_topic)
    client.publish(agent.request_topic, json.dumps({"id": "last", "prompt": "hi", "max_tokens": 8}))
    doc = client.wait_for(lambda d: d.get("id") == "last")
    assert doc["ok"]
    assert agent.stop(signal.SIGTERM) == 0
    states = [d["state"] for d in client.drain() if d.get("device_id") == agent.device_id]
    assert states[-2:] == ["stopping", "offline"]
    watcher = Client(broker.port)  # the retained status says offline, not the will
    try:
        watcher.subscribe(agent.status_topic)
        retained = watcher.wait_for(lambda d: d.get("device_id") == agent.device_id, 5)
        assert retained["state"] == "offline" and retained["model"] is not None
    finally:
        watcher.close()


def test_sigint_stops_with_exit_0(broker: Broker, client: Client,
                                  start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent(broker, client)
    assert agent.stop(signal.SIGINT) == 0


def test_killed_agent_leaves_the_last_will(broker: Broker, client: Client,
                                           start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent(broker, client, mqtt__keepalive=5)
    agent.stop(signal.SIGKILL)
    doc = client.wait_for(lambda d: d.get("device_id") == agent.device_id and d["state"] == "offline", 20)
    assert doc["state"] == "offline"
    assert doc["model"] is None  # the will of the first connect, made before the model loaded


def across_a_broker_restart(own: Broker, start_agent: Callable[..., AgentProcess]
                            ) -> tuple[AgentProcess, Client, dict[str, Any]]:
    """An agent started on `own`, then `own` killed (it forgets every session, subscription and
    retained message) and started again: the agent, a client watching its status (close it),
    and the `ready` the agent republished once it had reconnected."""
    watcher = Client(own.port)
    agent = start_agent(own, watcher)
    watcher.close()
    own.stop(signal.SIGKILL)
    own.start()
    watcher = Client(own.port)
    watcher.subscribe(agent.status_topic)
    return agent, watcher, watcher.wait_for(lambda d: d.get("state") == "ready", 20)


def test_the_will_after_a_reconnect_names_the_model(own_broker: Broker,
                                                    start_agent: Callable[..., AgentProcess]) -> None:
    """MQTT fixes a will at connect time: each reconnect carries the status as it is then."""
    agent, watcher, ready = across_a_broker_restart(own_broker, start_agent)
    try:
        agent.stop(signal.SIGKILL)
        will = watcher.wait_for(lambda d: d.get("state") == "offline", 20)
    finally:
        watcher.close()
    assert will["device_id"] == agent.device_id and will["model"] == ready["model"] is not None
    assert will["provider"] == ready["provider"] is not None
    assert will["provider_reason"] == ready["provider_reason"]


def test_broker_restart_then_the_next_request_is_answered(own_broker: Broker,
                                                          start_agent: Callable[..., AgentProcess]) -> None:
    # The broker lost everything: the agent reconnects, republishes status, resubscribes.
    agent, pipeline, _ = across_a_broker_restart(own_broker, start_agent)
    try:
        pipeline.subscribe(agent.response_topic)
        pipeline.publish(agent.request_topic, json.dumps({"id": "after", "prompt": "hi", "max_tokens": 3}))
        doc = pipeline.wait_for(lambda d: d.get("id") == "after", 20)
        assert doc["ok"] is True
    finally:
        pipeline.close()
    assert agent.stop() == 0


def test_agent_started_before_the_broker_connects_when_it_comes(tmp_path: Path, tiny_model: Path) -> None:
    own = Broker()
    try:
        agent = AgentProcess(tmp_path, own.port, tiny_model, device_id="early")
        agent.proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(agent.config)],
                                      stdout=agent.log_path.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not any(line["event"] == "mqtt.connect_failed" for line in agent.log_lines()):
            assert time.monotonic() < deadline, "the agent never tried to connect"
            time.sleep(0.1)
        own.start()
        watcher = Client(own.port)
        try:
            watcher.subscribe(agent.status_topic)
            assert watcher.wait_for(lambda d: d.get("state") == "ready", 30)["device_id"] == "early"
        finally:
            watcher.close()
        assert agent.stop() == 0
    finally:
        own.close()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_check_config_prints_effective_settings(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('device_id = "box1"\n[mqtt]\nport = 1999\n[model]\npath = "models/phi"\n')
    result = run_cli("check-config", "--config", str(config), env={"EDGE_AGENT_MQTT__HOST": "broker.lan"})
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout.split("\n", 1)[1])
    assert settings["device_id"] == "box1" and settings["mqtt"]["port"] == 1999
    assert settings["mqtt"]["host"] == "broker.lan"  # the environment overrides the file
    assert settings["model"]["path"] == str(tmp_path / "models" / "phi")  # relative to the file


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "config" / "agent.example.toml"
    result = run_cli("check-config", "--config", str(example))
    assert result.returncode == 0, result.stderr


def test_example_config_names_every_setting() -> None:
    """It says "every key, with its default": each settings field appears in it, set or as a
    commented-out line (tables with free names, like cameras, by their fields)."""
    import re

    from pydantic import BaseModel

    from edge_agent.settings.model import CameraSettings, Settings, TemplateSettings, TlsSettings

    example = (Path(__file__).resolve().parent.parent / "config" / "agent.example.toml").read_text()
    named = set(re.findall(r"^#? ?([a-z_]+) = ", example, re.MULTILINE))
    for table in re.findall(r"^#? ?\[([a-z_.]+)\]", example, re.MULTILINE):
        named |= set(table.split("."))

    def fields(model: type[BaseModel]) -> set[str]:
        found = set(model.model_fields)
        for field in model.model_fields.values():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                found |= fields(field.annotation)
        return found

    expected = fields(Settings) | fields(TlsSettings) | fields(CameraSettings) | fields(TemplateSettings)
    assert expected - named == set()


@pytest.mark.parametrize("text, env, expected", [
    ('device_id = "a/b"\n', {}, "device_id: Value error, device_id must be"),
    ('colour = "red"\n', {}, "colour: unknown key"),
    ('[mqtt]\nport = 70000\n', {}, "mqtt.port: Input should be less than or equal to 65535"),
    ('[mqtt]\nprotocol = "4"\n', {}, "mqtt.protocol"),
    ('[mqtt]\ntopic_prefix = "a/#"\n', {}, "topic_prefix must be"),
    ('[model]\nprovider = "tpu"\n', {}, "model.provider"),
    ('[limits]\nqueue_size = 0\n', {}, "limits.queue_size"),
    ('[mqtt\nport = 1\n', {}, "invalid TOML"),
    ('', {"EDGE_AGENT_MQTT__PORT": "many"}, "environment EDGE_AGENT_MQTT__PORT: mqtt.port"),
])
def test_bad_settings_exit_78_naming_file_and_key(tmp_path: Path, text: str, env: dict[str, str],
                                                  expected: str) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(text)
    for command in ("check-config", "run"):
        result = run_cli(command, "--config", str(config), env=env)
        assert result.returncode == 78
        assert expected in result.stderr
        if not env:
            assert str(config) in result.stderr


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('device_id = "#"\n[mqtt]\nport = 0\nkeepalive = 1\n')
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 78 and result.stderr.count("config error:") == 3


def test_missing_config_file_that_was_asked_for_is_an_error(tmp_path: Path) -> None:
    result = run_cli("check-config", env={"EDGE_AGENT_CONFIG": str(tmp_path / "none.toml")})
    assert result.returncode == 78 and "cannot read" in result.stderr


def test_run_without_a_model_folder_exits_78(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[model]\npath = "{tmp_path}"\n')
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 78 and "no genai_config.json" in result.stderr


def test_unavailable_provider_falls_back_and_says_why(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess], tiny_model: Path) -> None:
    agent = start_agent(broker, client, wait_ready=False, model__provider="cuda")  # fallback ["cpu"]
    ready = client.wait_for(lambda d: d.get("device_id") == agent.device_id and d["state"] == "ready", 30)
    assert ready["provider"] == "cpu"
    assert ready["provider_reason"].startswith(f"configured: cuda failed ({cuda_missing(tiny_model)}")
    assert ready["provider_reason"].endswith("fell back to cpu")
    loaded = next(line for line in agent.log_lines() if line["event"] == "model.loaded")
    assert loaded["provider"] == "cpu" and loaded["reason"] == ready["provider_reason"]
    assert agent.stop() == 0


def test_unavailable_provider_fails_with_a_clear_message(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent(broker, client, wait_ready=False, model__provider="cuda", model__fallback=[])
    assert agent.proc is not None and agent.proc.wait(30) == 1
    failure = next(line for line in agent.log_lines() if line["event"] == "model.load_failed")
    assert "provider 'cuda'" in failure["error"] and "onnxruntime-genai-cuda" in failure["error"]
    degraded = client.wait_for(lambda d: d.get("device_id") == agent.device_id and d["state"] == "degraded", 10)
    assert "cuda" in degraded["error"]
    offline = client.wait_for(lambda d: d.get("device_id") == agent.device_id and d["state"] == "offline", 10)
    assert offline["error"] == degraded["error"]


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("edge-agent 0.")


def test_unreadable_genai_config_exits_78(tmp_path: Path) -> None:
    (tmp_path / "genai_config.json").write_text("{ not json")
    config = tmp_path / "agent.toml"
    config.write_text(f'[model]\npath = "{tmp_path}"\n[mqtt]\nport = 1\n')
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 78 and "cannot read" in result.stdout + result.stderr


def test_relative_camera_files_are_taken_from_the_settings_folder(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent.settings.files import load_settings

    etc = tmp_path / "etc"
    (etc / "conf.d").mkdir(parents=True)
    (etc / "agent.toml").write_text(
        '[cameras.door]\nsource = "clips/door.mp4"\n[cameras.usb]\nsource = "0"\n'
        '[cameras.dev]\nsource = "/dev/video3"\n[cameras.gate]\nsource = "rtsp://10.0.0.5/s"\n'
        '[cameras.csi]\nsource = "videotestsrc ! videoconvert ! appsink"\n[cameras.abs]\nsource = "/srv/a.mp4"\n')
    (etc / "conf.d" / "50-yard.toml").write_text('[cameras.yard]\nsource = "yard.mp4"\n')
    monkeypatch.chdir(tmp_path)  # not the settings' folder
    settings, _ = load_settings(etc / "agent.toml")
    assert {name: cam.source for name, cam in settings.cameras.items()} == {
        "door": str(etc / "clips" / "door.mp4"), "usb": "0", "dev": "/dev/video3", "gate": "rtsp://10.0.0.5/s",
        "csi": "videotestsrc ! videoconvert ! appsink", "abs": "/srv/a.mp4",
        "yard": str(etc / "conf.d" / "yard.mp4")}


def test_check_config_masks_camera_passwords(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[cameras.gate]\nsource = "rtsp://admin:hunter2@10.0.0.5/stream1"\n')
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout and "rtsp://***@10.0.0.5/stream1" in result.stdout
