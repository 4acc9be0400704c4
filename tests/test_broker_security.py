"""TLS, mutual TLS and passwords to the broker, with certificates made at test time and a
password file made by mosquitto_passwd; secrets also from systemd's $CREDENTIALS_DIRECTORY."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from support import AgentProcess, Broker, Client

PASSWORD = "pw-7f3a9c-right"
WRONG_PASSWORD = "pw-0d21e5-wrong"
RETRY_WATCH_S = 4.0


@pytest.fixture(scope="module")
def tls_broker() -> Iterator[Broker]:
    server = Broker(tls=True)
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def mtls_broker() -> Iterator[Broker]:
    server = Broker(tls=True, require_certificate=True)
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def auth_broker() -> Iterator[Broker]:
    server = Broker(users={"agent": PASSWORD})
    server.start()
    yield server
    server.close()


def ask(agent: AgentProcess, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", "ask", "Say hi", "--max-tokens", "4",
                           "--timeout", "20", "--config", str(agent.config), *extra],
                          capture_output=True, text=True, timeout=60)


def answers(client: Client, agent: AgentProcess, rid: str) -> dict[str, Any]:
    client.subscribe(agent.response_topic)
    client.publish(agent.request_topic, json.dumps({"id": rid, "prompt": "hi", "max_tokens": 4}))
    return client.wait_for(lambda d: d.get("id") == rid)


def events(agent: AgentProcess, *names: str) -> list[dict[str, Any]]:
    return [line for line in agent.log_lines() if line.get("event") in names]


def keeps_retrying(agent: AgentProcess, watcher: Client, *failures: str) -> list[dict[str, Any]]:
    """The agent stays alive, never says anything on the broker, and logs failures repeatedly."""
    deadline = time.monotonic() + RETRY_WATCH_S
    while time.monotonic() < deadline and len(events(agent, *failures)) < 2:
        time.sleep(0.2)
    assert agent.proc is not None and agent.proc.poll() is None, "the agent exited"
    assert not [d for d in watcher.drain() if d.get("device_id") == agent.device_id], "it got through"
    assert not events(agent, "mqtt.connected")
    found = events(agent, *failures)
    assert len(found) >= 2, f"no retries logged: {agent.log_path.read_text()[-2000:]}"
    return found


def test_tls_answers_and_ask_works(tls_broker: Broker, start_agent: Callable[..., AgentProcess]) -> None:
    assert tls_broker.pki is not None
    watcher = Client(tls_broker.tls_port, ca_file=tls_broker.pki.ca_cert)
    try:
        agent = start_agent(tls_broker, watcher, mqtt__port=tls_broker.tls_port,
                            mqtt__tls={"ca_file": str(tls_broker.pki.ca_cert)})
        assert events(agent, "mqtt.connected")[0]["tls"] is True
        assert answers(watcher, agent, "over-tls")["ok"]
        done = ask(agent)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip()
    finally:
        watcher.close()


def test_wrong_ca_keeps_retrying_and_says_why(
        tls_broker: Broker, client: Client, start_agent: Callable[..., AgentProcess]) -> None:
    assert tls_broker.pki is not None
    watcher = Client(tls_broker.port)  # plain listener of the same broker: sees all it would say
    try:
        agent = start_agent(tls_broker, watcher, wait_ready=False, mqtt__port=tls_broker.tls_port,
                            mqtt__tls={"ca_file": str(tls_broker.pki.other_ca_cert)})
        failures = keeps_retrying(agent, watcher, "mqtt.connect_failed")
        assert "CERTIFICATE_VERIFY_FAILED" in failures[0]["error"]
        done = ask(agent, "--timeout", "5")
        assert done.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in done.stderr
    finally:
        watcher.close()


def test_mutual_tls(mtls_broker: Broker, start_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    pki = mtls_broker.pki
    assert pki is not None
    watcher = Client(mtls_broker.port)
    try:
        agent = start_agent(mtls_broker, watcher, mqtt__port=mtls_broker.tls_port,
                            mqtt__tls={"ca_file": str(pki.ca_cert), "cert_file": str(pki.client_cert),
                                       "key_file": str(pki.client_key)})
        assert answers(watcher, agent, "over-mtls")["ok"]
        assert ask(agent).returncode == 0

        # the key from systemd's credentials when key_file is not set
        credentials = tmp_path / "credentials"
        credentials.mkdir()
        shutil.copy(pki.client_key, credentials / "mqtt-tls-key")
        from_credentials = start_agent(
            mtls_broker, watcher, mqtt__port=mtls_broker.tls_port,
            mqtt__tls={"ca_file": str(pki.ca_cert), "cert_file": str(pki.client_cert)},
            env={"CREDENTIALS_DIRECTORY": str(credentials)})
        assert answers(watcher, from_credentials, "key-from-credentials")["ok"]

        # no client certificate: the broker sends a TLS alert (after the handshake, in TLS 1.3)
        anonymous = start_agent(mtls_broker, watcher, wait_ready=False, mqtt__port=mtls_broker.tls_port,
                                mqtt__tls={"ca_file": str(pki.ca_cert)})
        # The broker's alert names the reason when the client reads it; when it meets the CONNECT
        # being written instead, the client sees only an EOF. Over a few tries, it reads one.
        failures = ("mqtt.connect_failed", "mqtt.connection_lost")
        keeps_retrying(anonymous, watcher, *failures)
        deadline = time.monotonic() + 10
        while not any("CERTIFICATE_REQUIRED" in (line["error"] or "")
                      for line in events(anonymous, *failures)):
            assert time.monotonic() < deadline, events(anonymous, *failures)[:4]
            time.sleep(0.2)
    finally:
        watcher.close()


def test_password_from_file_and_from_credentials(
        auth_broker: Broker, start_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    password_file = tmp_path / "mqtt-password"
    password_file.write_text(PASSWORD + "\n")
    watcher = Client(auth_broker.port, user=("agent", PASSWORD))
    try:
        agent = start_agent(auth_broker, watcher, mqtt__username="agent",
                            mqtt__password_file=str(password_file))
        assert answers(watcher, agent, "with-password")["ok"]
        assert ask(agent).returncode == 0

        credentials = tmp_path / "credentials"
        credentials.mkdir()
        (credentials / "mqtt-password").write_text(PASSWORD)
        from_credentials = start_agent(auth_broker, watcher, mqtt__username="agent",
                                       env={"CREDENTIALS_DIRECTORY": str(credentials)})
        assert answers(watcher, from_credentials, "password-from-credentials")["ok"]
    finally:
        watcher.close()


def test_wrong_password_is_refused_retried_and_never_logged(
        auth_broker: Broker, start_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    password_file = tmp_path / "wrong-password"
    password_file.write_text(WRONG_PASSWORD)
    watcher = Client(auth_broker.port, user=("agent", PASSWORD))
    try:
        agent = start_agent(auth_broker, watcher, wait_ready=False, mqtt__username="agent",
                            mqtt__password_file=str(password_file))
        refusals = keeps_retrying(agent, watcher, "mqtt.refused")
        assert "password" in refusals[0]["reason"].lower() or "authori" in refusals[0]["reason"].lower()
        done = ask(agent, "--timeout", "5")
        assert done.returncode == 2 and "refused" in done.stderr
        assert WRONG_PASSWORD not in done.stderr + done.stdout
        assert WRONG_PASSWORD not in agent.log_path.read_text()
    finally:
        watcher.close()


def test_blank_or_missing_credentials_count_as_absent(tmp_path: Path, monkeypatch: Any) -> None:
    from edge_agent.mqtt.client import _credential

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert _credential("mqtt-password") is None
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert _credential("mqtt-password") is None
    (tmp_path / "mqtt-password").write_text("\n")  # the unit's SetCredential= fallback
    assert _credential("mqtt-password") is None
    (tmp_path / "mqtt-password").write_text("secret\n")
    assert _credential("mqtt-password") == tmp_path / "mqtt-password"
