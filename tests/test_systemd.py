"""systemd integration: sd_notify against a socket the test opens, READY=1 and watchdog pings
from the real daemon, pings withheld for a wedged part, the unit's verification and score."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
from structlog.testing import capture_logs

from edge_agent.daemon import app as app_module
from edge_agent.mqtt import client as mqtt
from edge_agent.work import lanes as scheduler_module
from edge_agent.daemon.app import Agent, request_limits
from edge_agent.work.jobs import Job
from edge_agent.health.systemd import SystemdNotifier, SystemdService
from edge_agent.protocol import parse_request
from edge_agent.work.lanes import Scheduler
from edge_agent.settings.model import Settings
from faults import fault_hooks_env
from support import REPO, AgentProcess, Broker, Client

UNIT = REPO / "systemd" / "edge-agent.service"
MAX_EXPOSURE = 2.0


class NotifySocket:
    """What systemd listens on: a datagram socket, by path or in the abstract namespace."""

    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._dir = None
        if abstract:
            name = f"edge-agent-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            self._dir = tempfile.mkdtemp(prefix="notify-")  # short: AF_UNIX paths max 108 bytes
            path = f"{self._dir}/notify"
            self.sock.bind(path)
            self.env_value = path

    def receive(self, timeout: float = 5.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    def collect(self, seconds: float) -> list[dict[str, str]]:
        out, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                out.append(self.receive(left))
            except TimeoutError:
                break
        return out

    def wait_for(self, key: str, timeout: float) -> tuple[dict[str, str], list[dict[str, str]]]:
        """The first message with `key`, and those that came before it."""
        before, deadline = [], time.monotonic() + timeout
        while True:
            message = self.receive(max(0.01, deadline - time.monotonic()))
            if key in message:
                return message, before
            before.append(message)

    def close(self) -> None:
        self.sock.close()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest) -> Iterator[NotifySocket]:
    sock = NotifySocket(abstract=request.param == "abstract")
    yield sock
    sock.close()


# --- the notifier ------------------------------------------------------------------------------
def test_notifier_sends_each_message(notify_socket: NotifySocket) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": notify_socket.env_value})
    assert notifier.enabled and notifier.watchdog_interval() is None
    assert notifier.ready("ready: model on cpu")
    assert notify_socket.receive() == {"READY": "1", "STATUS": "ready: model on cpu"}
    assert notifier.watchdog()
    assert notify_socket.receive() == {"WATCHDOG": "1"}
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    message = notify_socket.receive()
    assert message["RELOADING"] == "1"
    assert before <= int(message["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.stopping("stopping\nnow")
    assert notify_socket.receive() == {"STOPPING": "1", "STATUS": "stopping now"}


def test_notifier_is_a_no_op_outside_systemd() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert not notifier.ready() and not notifier.watchdog() and notifier.watchdog_interval() is None
    assert not SystemdNotifier({"NOTIFY_SOCKET": "relative/path"}).enabled


def test_a_vanished_socket_is_logged_not_raised() -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": f"/tmp/no-such-{uuid.uuid4().hex}"})
    with capture_logs() as logs:
        assert not notifier.ready()
    assert [e["event"] for e in logs] == ["systemd.notify_failed"]


def test_watchdog_interval_from_the_environment() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000"}
    assert SystemdNotifier(env).watchdog_interval() == 30.0
    assert SystemdNotifier({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval() == 30.0
    assert SystemdNotifier({**env, "WATCHDOG_PID": "1"}).watchdog_interval() is None  # not ours
    assert SystemdNotifier({**env, "WATCHDOG_USEC": "0"}).watchdog_interval() is None
    assert SystemdNotifier({**env, "WATCHDOG_USEC": "soon"}).watchdog_interval() is None
    assert SystemdNotifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval() is None  # no socket


# --- READY once, pings only while everything makes progress ---------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ready_once_and_pings_every_half_interval_while_progressing(notify_socket: NotifySocket) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": notify_socket.env_value, "WATCHDOG_USEC": "4000000"})
    clock, progressing = FakeClock(), [True]
    service = SystemdService(notifier, lambda: progressing[0], clock)
    assert service.ping_every_s == 2.0 and service.tick_s(1.0) == 1.0 and service.tick_s(5.0) == 2.0
    service.tick(serving=False)  # loading: pings may flow, READY may not
    assert notify_socket.receive() == {"WATCHDOG": "1"}
    clock.now += 2.0
    service.tick(serving=True, status="ready")
    assert notify_socket.receive() == {"READY": "1", "STATUS": "ready"}
    assert notify_socket.receive() == {"WATCHDOG": "1"}
    clock.now += 1.0
    service.tick(serving=True)  # not due yet
    assert notify_socket.collect(0.2) == []
    progressing[0] = False
    with capture_logs() as logs:
        for _ in range(3):
            clock.now += 2.0
            service.tick(serving=True)
    assert notify_socket.collect(0.2) == []  # withheld: systemd will restart the service
    assert [e["event"] for e in logs] == ["watchdog.withheld"]
    progressing[0] = True
    service.tick(serving=True)
    assert notify_socket.receive() == {"WATCHDOG": "1"}  # and READY=1 was not repeated


def test_reload_pings_only_while_the_parts_progress_and_never_stretches(notify_socket: NotifySocket) -> None:
    """The main loop waits for the reload: a helper pings for it, on the same terms."""
    notifier = SystemdNotifier({"NOTIFY_SOCKET": notify_socket.env_value, "WATCHDOG_USEC": "400000"})
    progressing = [True]
    service = SystemdService(notifier, lambda: progressing[0])
    service.tick(serving=True)
    notify_socket.collect(0.1)  # READY=1 and a ping
    with capture_logs() as logs:
        with service.reloading(budget_s=600):
            first = notify_socket.receive()
            assert first["RELOADING"] == "1" and "MONOTONIC_USEC" in first
            pings = notify_socket.collect(0.7)
            assert 2 <= len(pings) <= 5 and all(m == {"WATCHDOG": "1"} for m in pings)  # every 0.2 s
            progressing[0] = False  # a part wedges while the reload goes on
            notify_socket.collect(0.1)  # a ping decided just before
            assert notify_socket.collect(0.8) == []
        assert notify_socket.receive() == {"READY": "1", "STATUS": "ready"}
        assert notify_socket.collect(0.3) == []  # no WATCHDOG_USEC on the way out either
    assert [e["event"] for e in logs] == ["watchdog.withheld"]


def test_reload_past_its_budget_stops_the_pings(notify_socket: NotifySocket) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": notify_socket.env_value, "WATCHDOG_USEC": "400000"})
    service = SystemdService(notifier, lambda: True)
    with capture_logs() as logs:
        with service.reloading(budget_s=0.5):  # before READY=1: no RELOADING=1 either
            assert 2 <= len(notify_socket.collect(0.5)) <= 4
            assert notify_socket.collect(0.6) == []  # a reload stuck past its budget: no more
    assert [e["event"] for e in logs] == ["watchdog.withheld"]
    service.tick(serving=False)  # the main loop is back
    assert notify_socket.receive() == {"WATCHDOG": "1"}


# --- liveness of the parts ----------------------------------------------------------------------
def test_scheduler_progress_idle_busy_stuck_and_dead() -> None:
    release = threading.Event()
    worker = Scheduler(2, lambda job: release.wait(10))
    assert not worker.progressing(60)  # not started
    worker.start()
    assert worker.progressing(60)
    job = Job(parse_request(b'{"prompt": "hi"}', request_limits(Settings())), "r",
              deadline=time.monotonic() + 5)
    assert worker.submit(job)
    _wait(lambda: worker.running == 1)
    started, deadline = next(w.busy for w in worker._workers if w.busy is not None)  # type: ignore[misc]
    grace = scheduler_module.STUCK_GRACE_S
    assert worker.progressing(60, now=deadline + grace - 0.1)
    assert not worker.progressing(60, now=deadline + grace + 0.1)  # past its deadline: wedged
    assert not worker.progressing(1, now=started + 1 + grace + 0.1)  # the budget caps the deadline
    assert not worker.progressing(60, now=time.monotonic() + 3600)
    release.set()
    _wait(lambda: worker.running == 0)
    assert worker.progressing(60)
    assert not worker.progressing(60, now=worker._workers[0].last_beat + scheduler_module.IDLE_STALE_S + 0.1)
    worker.stop(1)
    assert not worker.progressing(60)


@pytest.fixture
def bare_agent(broker: Broker, tiny_model: Path) -> Iterator[tuple[Agent, threading.Event]]:
    """An in-process Agent with a real broker link and a worker whose jobs hang until released;
    no model loaded (the parts' liveness is what is under test)."""
    settings = Settings(device_id=f"wd-{uuid.uuid4().hex[:8]}", model={"path": str(tiny_model)},
                        mqtt={"port": broker.port})
    agent = Agent(settings)
    release = threading.Event()
    agent.scheduler = Scheduler(1, lambda job: release.wait(30))
    agent.scheduler.start()
    agent.link.start()
    assert agent.link.wait_connected(10)
    yield agent, release
    release.set()
    agent.scheduler.stop(1)
    agent.link.stop()


def test_wedged_mqtt_loop_stops_the_pings(bare_agent: tuple[Agent, threading.Event], broker: Broker,
                                          notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, _ = bare_agent
    monkeypatch.setattr(app_module, "MQTT_LOOP_STALE_S", 1.0)
    notifier = SystemdNotifier({"NOTIFY_SOCKET": notify_socket.env_value, "WATCHDOG_USEC": "200000"})
    service = SystemdService(notifier, agent.making_progress)
    service.tick(serving=False)
    assert notify_socket.receive() == {"WATCHDOG": "1"}
    # A message callback that never returns wedges paho's network thread (still "alive").
    stuck, release = threading.Event(), threading.Event()
    agent.link._on_message = lambda incoming: (stuck.set(), release.wait(30))  # type: ignore[method-assign]
    agent.link.accept_requests(True)
    publisher = Client(broker.port)
    try:
        time.sleep(0.3)  # the SUBACK
        publisher.publish(agent.topics.request, b'{"prompt": "hi"}')
        assert stuck.wait(5)
        time.sleep(1.2)
        assert agent.link.loop_alive() and not agent.making_progress()
        for _ in range(5):
            time.sleep(0.1)
            service.tick(serving=False)
        assert notify_socket.collect(0.3) == []
    finally:
        release.set()
        publisher.close()
    _wait(agent.making_progress)
    service.tick(serving=False)
    assert notify_socket.receive() == {"WATCHDOG": "1"}


def test_wedged_worker_stops_the_pings(bare_agent: tuple[Agent, threading.Event],
                                       notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, release = bare_agent
    assert agent.scheduler is not None
    monkeypatch.setattr(scheduler_module, "STUCK_GRACE_S", 0.0)
    notifier = SystemdNotifier({"NOTIFY_SOCKET": notify_socket.env_value, "WATCHDOG_USEC": "200000"})
    service = SystemdService(notifier, agent.making_progress)
    # The worker takes a job due in 0.3 s and never comes back.
    job = Job(parse_request(b'{"prompt": "hi"}', agent.limits), "r", deadline=time.monotonic() + 0.3)
    assert agent.scheduler.submit(job)
    _wait(lambda: agent.scheduler is not None and agent.scheduler.running > 0)
    time.sleep(0.1)
    service.tick(serving=False)
    assert notify_socket.receive() == {"WATCHDOG": "1"}  # busy, but within its deadline
    time.sleep(0.4)
    assert not agent.making_progress()
    for _ in range(5):
        time.sleep(0.1)
        service.tick(serving=False)
    assert notify_socket.collect(0.3) == []
    release.set()
    _wait(lambda: agent.making_progress())
    service.tick(serving=False)
    assert notify_socket.receive() == {"WATCHDOG": "1"}


# --- the daemon under a pretend systemd --------------------------------------------------------------
def test_daemon_notifies_ready_after_status_ready_then_pings_then_stopping(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess]) -> None:
    sock = NotifySocket()
    try:
        agent = start_agent(broker, client, env={"NOTIFY_SOCKET": sock.env_value,
                                                 "WATCHDOG_USEC": "1000000"})
        ready, before = sock.wait_for("READY", 10)
        assert ready["STATUS"].startswith("ready: ")
        assert all("WATCHDOG" in m for m in before)  # start-up sends nothing else
        _wait(lambda: "systemd.ready" in _events(agent))  # logged just after the datagram
        assert _events(agent).index("agent.ready") < _events(agent).index("systemd.ready")
        pings = [m for m in sock.collect(2.2) if m.get("WATCHDOG") == "1"]
        assert 3 <= len(pings) <= 6  # every 0.5 s
        assert agent.stop(signal.SIGTERM) == 0
        stopping, _ = sock.wait_for("STOPPING", 5)
        assert stopping["STOPPING"] == "1"
    finally:
        sock.close()


def test_daemon_is_not_ready_until_the_broker_is_reachable(
        client: Client, start_agent: Callable[..., AgentProcess]) -> None:
    later = Broker()  # its port is chosen, nothing listens there yet
    sock = NotifySocket()
    try:
        agent = start_agent(later, client, wait_ready=False, env={"NOTIFY_SOCKET": sock.env_value})
        _wait(lambda: "agent.ready" in _events(agent), 60)
        assert sock.collect(1.5) == []  # model loaded and warmed up, but no broker: not ready
        later.start()
        ready, _ = sock.wait_for("READY", 15)
        assert ready["READY"] == "1"
        agent.stop()
    finally:
        sock.close()
        later.close()


# The daemon's own MQTT network thread stops making progress: paho's loop() never returns once
# the trigger file exists (as a callback stuck on a lock, or a socket call that hangs, would do).
WEDGE_SITECUSTOMIZE = """
import os
import threading

import paho.mqtt.client as paho

from edge_agent.daemon import app

app.MQTT_LOOP_STALE_S = 1.0  # instead of 10 s, so the test is short
_loop = paho.Client.loop


def loop(self, *args, **kwargs):
    if os.path.exists(os.environ["WEDGE_MQTT_FILE"]):
        threading.Event().wait()  # never returns: the thread is alive but stuck
    return _loop(self, *args, **kwargs)


paho.Client.loop = loop
"""


def test_daemon_with_a_wedged_mqtt_loop_stops_the_pings(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(WEDGE_SITECUSTOMIZE)
    trigger = tmp_path / "wedge"
    sock = NotifySocket()
    try:
        agent = start_agent(broker, client, env={
            "NOTIFY_SOCKET": sock.env_value, "WATCHDOG_USEC": "1000000", "WEDGE_MQTT_FILE": str(trigger),
            "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])})
        sock.wait_for("READY", 10)
        assert len([m for m in sock.collect(1.6) if m.get("WATCHDOG") == "1"]) >= 2  # every 0.5 s
        trigger.touch()
        wedged_at = time.monotonic()
        _wait(lambda: "watchdog.withheld" in _events(agent), 10)
        sock.collect(0.1)  # pings sent before it was withheld, still in the socket's buffer
        late = sock.collect(3.0)
        assert [m for m in late if m.get("WATCHDOG") == "1"] == []
        assert time.monotonic() - wedged_at < 10
        # The process lives on (its threads are all alive): only the watchdog can end it.
        assert agent.proc is not None and agent.proc.poll() is None
        assert "agent.unhealthy" not in _events(agent)
    finally:
        sock.close()


def test_daemon_reloading_with_a_wedged_mqtt_loop_sends_no_ping_and_no_stretch(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    """A reload that loads a new model (5 s) is under way when the MQTT loop wedges: the pings
    stop as they would outside a reload, and no WATCHDOG_USEC buys the wedged daemon minutes."""
    env = fault_hooks_env(tmp_path / "hooks", slow_load_s=5.0)
    with (tmp_path / "hooks" / "sitecustomize.py").open("a") as hooks:
        hooks.write(WEDGE_SITECUSTOMIZE)
    trigger = tmp_path / "wedge"
    sock = NotifySocket()
    try:
        agent = start_agent(broker, client, inference__max_batch=1, env={
            **env, "NOTIFY_SOCKET": sock.env_value, "WATCHDOG_USEC": "1000000", "WEDGE_MQTT_FILE": str(trigger)})
        sock.wait_for("READY", 10)
        agent.rewrite(inference__max_batch=2)  # a new model engine: loaded while the old one serves
        _, before = sock.wait_for("RELOADING", 10)
        during = _timed(sock, 1.2)
        assert [m for _, m in during] and all(m == {"WATCHDOG": "1"} for _, m in during)  # pinged for
        trigger.touch()
        wedged_at = time.monotonic()
        after = _timed(sock, 10.0, until="READY")  # the reload ends meanwhile
        assert after and "READY" in after[-1][1] and after[-1][0] - wedged_at > 2.0, after
        after += _timed(sock, 2.0)
        assert not [m for m in before + [m for _, m in during + after] if "WATCHDOG_USEC" in m]
        # Noticed 1 s after the loop's last turn (MQTT_LOOP_STALE_S), a ping interval at most later.
        late = [(round(t - wedged_at, 2), m) for t, m in after if "WATCHDOG" in m and t - wedged_at > 1.9]
        assert late == []
        assert "watchdog.withheld" in _events(agent)
        assert agent.proc is not None and agent.proc.poll() is None
    finally:
        sock.close()


# --- credentials ---------------------------------------------------------------------------------
def test_blank_credential_placeholder_counts_as_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The unit's SetCredential= fallback for a missing file is a blank line."""
    (tmp_path / "mqtt-password").write_text("\n")
    (tmp_path / "mqtt-tls-key").write_text("-----BEGIN PRIVATE KEY-----\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert mqtt._credential(mqtt.PASSWORD_CREDENTIAL) is None
    assert mqtt._credential(mqtt.TLS_KEY_CREDENTIAL) == tmp_path / "mqtt-tls-key"


# --- the unit file ---------------------------------------------------------------------------------
def test_unit_verifies_and_scores(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (scripts/setup.sh installs the systemd package)")
    # verify wants ExecStart='s program to exist: point it at a stand-in, keep everything else.
    program = tmp_path / "edge-agent"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    text = UNIT.read_text()
    assert text.count("ExecStart=/opt/edge-agent/venv/bin/edge-agent ") == 1
    unit = tmp_path / "edge-agent.service"
    unit.write_text(text.replace("ExecStart=/opt/edge-agent/venv/bin/edge-agent ", f"ExecStart={program} "))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                            check=False)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", f"--threshold={int(MAX_EXPOSURE * 10)}", str(UNIT)],
        capture_output=True, text=True, check=False)
    found = re.search(r"Overall exposure level for edge-agent\.service: (\d+\.\d)", security.stdout)
    assert found, security.stdout + security.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, security.stdout
    assert security.returncode == 0, security.stdout


def test_unit_has_what_the_daemon_relies_on() -> None:
    lines = {line.strip() for line in UNIT.read_text().splitlines()}
    for expected in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30", "Restart=on-failure",
                     "RestartPreventExitStatus=78", "ExecReload=/bin/kill -HUP $MAINPID",
                     "DeviceAllow=char-video4linux rw", "DeviceAllow=char-drm rw",
                     "LoadCredential=mqtt-password:/etc/edge-agent/credentials/mqtt-password",
                     f"LoadCredential={mqtt.TLS_KEY_CREDENTIAL}:/etc/edge-agent/credentials/mqtt-tls.key",
                     "SetCredential=mqtt-password:\\n", "ProtectSystem=strict"):
        assert expected in lines, expected
    assert not any(line.startswith("MemoryDenyWriteExecute=") for line in lines)  # CUDA JIT


# --- helpers -------------------------------------------------------------------------------------
def _events(agent: AgentProcess) -> list[str | None]:
    return [e.get("event") for e in agent.log_lines()]


def _timed(sock: NotifySocket, seconds: float, until: str | None = None) -> list[tuple[float, dict[str, str]]]:
    """What arrives within `seconds` (or up to the first message with `until`), with arrival times."""
    out: list[tuple[float, dict[str, str]]] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = sock.receive(left)
        except TimeoutError:
            break
        out.append((time.monotonic(), message))
        if until is not None and until in out[-1][1]:
            break
    return out


def _wait(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)
