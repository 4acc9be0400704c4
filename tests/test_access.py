"""Access: topic levels from settings are validated; the Mosquitto ACL of config/ confines each
device to its own topics (real broker, real agents); secrets stay out of logs, status,
check-config and the environment."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pydantic import ValidationError

from edge_agent.settings.model import Settings
from support import REPO, AgentProcess, Broker, Client

ACL_EXAMPLE = REPO / "config" / "mosquitto-acl.example"
PASSWORDS = {"box-a": "pw-a-5c1e9d", "box-b": "pw-b-77f0a2", "app-yard": "pw-y-0b93e4", "ops": "pw-o-2d6c11"}


# --- topic levels from settings --------------------------------------------------------------------
BAD_LEVELS = ["a/b", "+", "#", "box#1", "box+", "$SYS", "$share", "", " ", "box 1", ".hidden", "-x", "_x",
              "x" * 65, "box\x00", "box\n", "é", "a/#"]


@pytest.mark.parametrize("value", BAD_LEVELS)
@pytest.mark.parametrize("key", ["device_id", "mqtt.topic_prefix", "mqtt.shared_group", "camera name",
                                 "template name"])
def test_topic_levels_from_settings_are_validated(key: str, value: str) -> None:
    data: dict[str, Any] = {
        "device_id": {"device_id": value},
        "mqtt.topic_prefix": {"mqtt": {"topic_prefix": value}},
        "mqtt.shared_group": {"mqtt": {"shared_group": value}},
        "camera name": {"cameras": {value: {"source": "/dev/video0"}}},
        "template name": {"prompts": {"templates": {value: {"text": "x"}}}},
    }[key]
    with pytest.raises(ValidationError, match="1-64 characters"):
        Settings(**data)


def test_fleet_is_not_a_device_and_good_levels_pass() -> None:
    with pytest.raises(ValidationError, match="reserved"):
        Settings(device_id="fleet")
    settings = Settings(device_id="Box-1_a.b", mqtt={"topic_prefix": "site7", "shared_group": "pool-a"})
    assert settings.client_id == "edge-agent-Box-1_a.b"


# --- the ACL, with real agents ----------------------------------------------------------------------
def acl_text() -> str:
    """The example as shipped; its sample pipeline serves box1, here box-b."""
    return ACL_EXAMPLE.read_text().replace("box1", "box-b")


@pytest.fixture(scope="module")
def acl_broker() -> Iterator[Broker]:
    server = Broker(users=PASSWORDS, acl=acl_text(), extra=("use_username_as_clientid true",))
    server.start()
    yield server
    server.close()


def password_file(folder: Path, user: str) -> Path:
    path = folder / f"{user}.password"
    path.write_text(PASSWORDS[user] + "\n")
    return path


def raw_client(broker: Broker, user: str, client_id: str | None = None) -> tuple[paho.Client, list[Any]]:
    """A paho client as `user` that records PUBACK reason codes and received messages."""
    events: list[Any] = []
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"{user}-{uuid.uuid4().hex[:6]}",
                    protocol=MQTTProtocolVersion.MQTTv5)
    c.username_pw_set(user, PASSWORDS[user])
    c.on_publish = lambda cl, u, mid, reason, props: events.append(("puback", str(reason)))
    c.on_message = lambda cl, u, m: events.append(("message", m.topic, bytes(m.payload)))
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return c, events


def test_acl_confines_each_device_to_its_own_topics(acl_broker: Broker, tmp_path: Path,
                                                    start_agent: Callable[..., AgentProcess]) -> None:
    pipeline = Client(acl_broker.port, user=("app-yard", PASSWORDS["app-yard"]))
    ops = Client(acl_broker.port, user=("ops", PASSWORDS["ops"]))
    a_as_b: AgentProcess | None = None
    intruder: paho.Client | None = None
    try:
        b = start_agent(acl_broker, ops, device_id="box-b", mqtt__username="box-b",
                        mqtt__password_file=str(password_file(tmp_path, "box-b")),
                        mqtt__reply_topic_allow=["edge-agent/box-b/#"])
        pipeline.subscribe("edge-agent/box-b/response")
        pipeline.subscribe("edge-agent/box-b/status")
        pipeline.drain()

        # 1. A's agent, pointed at B's topics (device_id "box-b", A's user): it is subscribed to
        #    B's requests and publishes B's status, as far as it can tell.
        (tmp_path / "a").mkdir()
        a_as_b = AgentProcess(tmp_path / "a", acl_broker.port, Path(b.data["model"]["path"]), device_id="box-b",
                              mqtt__username="box-a", mqtt__password_file=str(password_file(tmp_path, "box-a")))
        a_as_b.start(ops, wait_ready=False)
        wait_event(a_as_b, "mqtt.subscribed")
        ids = [f"yard-{n}" for n in range(5)]
        for rid in ids:
            pipeline.publish(b.request_topic, json.dumps({"id": rid, "prompt": "hi", "max_tokens": 2}))
        answers = [pipeline.wait_for(lambda d: d.get("id") in ids) for _ in ids]  # in any order
        assert sorted(d["id"] for d in answers) == ids and all(d["ok"] for d in answers)
        a_as_b.stop()
        a_events = [line.get("event") for line in a_as_b.log_lines()]
        assert "agent.ready" in a_events and "mqtt.refused" not in a_events
        assert "request.accepted" not in a_events and "request.rejected" not in a_events
        # The broker took its status but refused it (MQTT 5 PUBACK "Not authorized"): logged.
        refused = [line for line in a_as_b.log_lines() if line.get("event") == "mqtt.publish_refused"]
        assert refused and refused[0]["topic"] == b.status_topic and "authorized" in refused[0]["reason"]
        # Its ready, stopping and offline status never reached B's topic: B is still ready there.
        statuses = [d for d in pipeline.drain() if "state" in d]
        assert statuses == [] and retained_status(ops, b)["state"] == "ready"

        # 2. A client logged in as A, with B's client id: it reads nothing of B's, its forged
        #    answer and status are refused, and B is not thrown off (use_username_as_clientid).
        intruder, seen = raw_client(acl_broker, "box-a", client_id=b.data.get("mqtt", {}).get(
            "client_id", "edge-agent-box-b"))
        intruder.subscribe("edge-agent/box-b/#", qos=1)
        time.sleep(0.3)
        intruder.publish("edge-agent/box-b/response", json.dumps({"id": "yard-0", "ok": True, "text": "open"}),
                         qos=1).wait_for_publish(5)
        intruder.publish("edge-agent/box-b/status", json.dumps({"state": "offline", "device_id": "box-b"}),
                         qos=1, retain=True).wait_for_publish(5)
        pipeline.publish(b.request_topic, json.dumps({"id": "yard-5", "prompt": "hi", "max_tokens": 2}))
        assert pipeline.wait_for(lambda d: d.get("id") == "yard-5")["ok"]
        time.sleep(0.5)
        assert pipeline.drain() == []  # no forged answer, no forged status, no second answer
        assert [e for e in seen if e[0] == "puback"] == [("puback", "Not authorized")] * 2
        assert [e for e in seen if e[0] == "message"] == [], "A read B's topics"
        assert retained_status(ops, b)["state"] == "ready"
        b_events = [line.get("event") for line in b.log_lines()]
        assert b_events.count("mqtt.connected") == 1 and "mqtt.disconnected" not in b_events

        # 3. B answers only where the ACL lets it write: a reply topic elsewhere is refused.
        pipeline.publish(b.request_topic, json.dumps({"id": "elsewhere", "prompt": "hi", "reply_to": "apps/x"}))
        refused = pipeline.wait_for(lambda d: d.get("id") == "elsewhere")
        assert refused["error"]["code"] == "bad_request" and "allow-list" in refused["error"]["message"]
    finally:
        if a_as_b is not None and a_as_b.proc is not None and a_as_b.proc.poll() is None:
            a_as_b.proc.kill()
        if intruder is not None:
            intruder.loop_stop()
            intruder.disconnect()
        pipeline.close()
        ops.close()


def wait_event(agent: AgentProcess, event: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while event not in [line.get("event") for line in agent.log_lines()]:
        assert time.monotonic() < deadline, agent.log_path.read_text()[-2000:]
        time.sleep(0.1)


def retained_status(reader: Client, agent: AgentProcess) -> dict[str, Any]:
    """Subscribing again replays the retained status. (A second connection with the same user
    would take the first one's place: use_username_as_clientid.)"""
    reader.drain()
    reader.subscribe(agent.status_topic)
    return reader.wait_for(lambda d: d.get("device_id") == agent.device_id, 5)


# --- secrets -----------------------------------------------------------------------------------------
SECRET = "s3cret-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def secret_broker() -> Iterator[Broker]:
    server = Broker(users={"box-s": SECRET, "ops": PASSWORDS["ops"]})
    server.start()
    yield server
    server.close()


def test_the_password_is_in_no_log_status_stats_output_or_environment(
        secret_broker: Broker, tmp_path: Path, start_agent: Callable[..., AgentProcess]) -> None:
    secret_file = tmp_path / "mqtt-password"
    secret_file.write_text(SECRET + "\n")
    watcher = Client(secret_broker.port, user=("ops", PASSWORDS["ops"]))
    try:
        watcher.subscribe("edge-agent/box-s/#")
        agent = start_agent(secret_broker, watcher, device_id="box-s", log_level="debug", stats_interval_s=1.0,
                            mqtt__username="box-s", mqtt__password_file=str(secret_file))
        assert agent.proc is not None
        watcher.publish(agent.request_topic, json.dumps({"id": "s1", "prompt": "hi", "max_tokens": 2}))
        assert watcher.wait_for(lambda d: d.get("id") == "s1" and "ok" in d)["ok"]  # not the request itself
        watcher.wait_for(lambda d: "uptime_s" in d, 10)  # a stats document went by too
        environ = Path(f"/proc/{agent.proc.pid}/environ").read_bytes()
        outputs = [subprocess.run([sys.executable, "-m", "edge_agent", "check-config", "--config",
                                   str(agent.config), *extra], capture_output=True, text=True, timeout=60)
                   for extra in ((), ("--explain",))]
        assert all(out.returncode == 0 for out in outputs)
        assert str(secret_file) in outputs[0].stdout  # the path is shown; what it holds is not
        agent.stop()
        published = Client(secret_broker.port, user=("ops", PASSWORDS["ops"]))
        try:
            published.subscribe(agent.status_topic)
            retained = published.wait_for(lambda d: d.get("device_id") == "box-s", 5)
        finally:
            published.close()
        seen = {
            "log": agent.log_path.read_text(),
            "environment": environ.decode(errors="replace"),
            "check-config": outputs[0].stdout + outputs[0].stderr,
            "check-config --explain": outputs[1].stdout + outputs[1].stderr,
            "retained status": json.dumps(retained),
            "everything published": json.dumps(watcher.drain()),
        }
        assert len(seen["log"]) > 1000  # debug logging: plenty was written
        for where, text in seen.items():
            assert SECRET not in text, where
    finally:
        watcher.close()
