"""Real components for the tests: a private mosquitto, the daemon as a process, an MQTT client
that talks to it the way a user's pipeline would."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from certs import Pki, make_pki

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 60.0
ANSWER_TIMEOUT_S = 30.0


def until(check: Callable[[], Any], what: str = "the condition", timeout: float = 20.0) -> Any:
    """The first true value of `check()`, polled every 50 ms; AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"never: {what} (in {timeout} s)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_model(name: str) -> Path:
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "build_test_models.py"), name],
                         check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


_cuda_missing: dict[Path, str] = {}


def cuda_missing(model: Path) -> str:
    """The start of what the installed ORT GenAI (CPU build) says when asked for CUDA, up to the
    first colon; our provider reasons must carry it. The wording depends on the ORT GenAI version:
    0.18 "Cuda interface not available: Failed to load library …", 0.11 "CUDA execution provider
    is not enabled in this build."."""
    if model not in _cuda_missing:
        import onnxruntime_genai as og
        import pytest

        config = og.Config(str(model))
        config.clear_providers()
        config.append_provider("cuda")
        try:
            og.Model(config)
        except Exception as exc:  # ORT GenAI raises plain RuntimeError
            _cuda_missing[model] = str(exc).split(":")[0]
        else:
            pytest.skip("this ORT GenAI loads CUDA: the missing-CUDA paths need its CPU build")
    return _cuda_missing[model]


class Broker:
    """A private mosquitto on a free loopback port; restartable on the same port.

    `tls`: a second listener on `tls_port` with certificates made now (`pki`);
    `require_certificate`: that listener wants a client certificate (mutual TLS);
    `users`: name → password, and anonymous clients are refused on every listener;
    `acl`: the text of an ACL file (`acl_file`); `extra`: more mosquitto.conf lines."""

    def __init__(self, persistence: bool = False, *, tls: bool = False,
                 require_certificate: bool = False, users: dict[str, str] | None = None,
                 acl: str | None = None, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        # mosquitto run as root drops to its own user: the folder must be readable/writable by it.
        self.dir = Path(tempfile.mkdtemp(prefix="mosq-"))
        self.dir.chmod(0o777)
        lines = [f"listener {self.port} 127.0.0.1", "set_tcp_nodelay true",
                 f"allow_anonymous {'false' if users else 'true'}"]
        if persistence:
            lines += ["persistence true", f"persistence_location {self.dir}/", "autosave_interval 1"]
        if users:
            lines.append(f"password_file {self._password_file(users)}")
        if acl is not None:
            (self.dir / "acl").write_text(acl)
            (self.dir / "acl").chmod(0o644)
            lines.append(f"acl_file {self.dir / 'acl'}")
        lines += extra
        self.tls_port: int | None = None
        self.pki: Pki | None = None
        if tls:
            pki_dir = self.dir / "pki"
            pki_dir.mkdir(mode=0o755)
            self.pki, self.tls_port = make_pki(pki_dir), free_port()
            lines += [f"listener {self.tls_port} 127.0.0.1", f"cafile {self.pki.ca_cert}",
                      f"certfile {self.pki.server_cert}", f"keyfile {self.pki.server_key}",
                      f"require_certificate {'true' if require_certificate else 'false'}"]
        (self.dir / "mosquitto.conf").write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def _password_file(self, users: dict[str, str]) -> Path:
        path = self.dir / "passwords"
        for name, password in users.items():
            subprocess.run(["mosquitto_passwd", *(["-c"] if not path.exists() else []), "-b",
                            str(path), name, password], check=True, capture_output=True)
        path.chmod(0o644)
        return path

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([exe, "-c", str(self.dir / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        for port in (self.port, self.tls_port):
            while port is not None:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("mosquitto did not start") from None
                    time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        """Stop with `sig` and start again on the same port (and persistence file)."""
        self.stop(sig)
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: the broker keeps its sockets open but answers nothing (a hung broker,
        or a network that silently drops packets)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen broker cannot act on SIGTERM
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Client:
    """A user's pipeline: publishes requests and collects every message on its topics."""

    def __init__(self, port: int, protocol: str = "5", *, ca_file: Path | None = None,
                 cert: tuple[Path, Path] | None = None, user: tuple[str, str] | None = None) -> None:
        self.v5 = protocol == "5"
        self.messages: queue.Queue[tuple[str, bytes, Any]] = queue.Queue()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:10]}",
                                  protocol=MQTTProtocolVersion.MQTTv5 if self.v5 else MQTTProtocolVersion.MQTTv311)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload), m.properties))
        if ca_file is not None:
            self.client.tls_set(ca_certs=str(ca_file), certfile=str(cert[0]) if cert else None,
                                keyfile=str(cert[1]) if cert else None)
        if user is not None:
            self.client.username_pw_set(*user)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.port = port

    def subscribe(self, topic: str) -> None:
        _, mid = self.client.subscribe(topic, qos=1)
        time.sleep(0.2)  # SUBACK is in flight; retained replays start right after

    def publish(self, topic: str, payload: bytes | str, *, response_topic: str | None = None,
                correlation: bytes | None = None, expiry_s: int | None = None) -> None:
        props = None
        if self.v5 and (response_topic or correlation or expiry_s):
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation:
                props.CorrelationData = correlation
            if expiry_s:
                props.MessageExpiryInterval = expiry_s
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(5)

    def next(self, timeout: float = ANSWER_TIMEOUT_S) -> tuple[str, dict[str, Any], Any]:
        topic, payload, props = self.messages.get(timeout=timeout)
        return topic, json.loads(payload), props

    def wait_for(self, predicate: Any, timeout: float = ANSWER_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no matching message")
            try:
                _, doc, _ = self.next(remaining)
            except queue.Empty:
                raise TimeoutError("no matching message") from None
            if predicate(doc):
                return doc

    def drain(self) -> list[dict[str, Any]]:
        out = []
        while not self.messages.empty():
            out.append(json.loads(self.messages.get()[1]))
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class AgentProcess:
    """`edge-agent run` as a real process with its own settings file."""

    def __init__(self, workdir: Path, broker_port: int, model: Path, **overrides: Any) -> None:
        self.device_id = overrides.pop("device_id", f"dev-{uuid.uuid4().hex[:8]}")
        self.env: dict[str, str] = overrides.pop("env", {})  # extra environment of the process
        self.prefix = "edge-agent"
        self.config = workdir / f"{self.device_id}.toml"
        self.log_path = workdir / f"{self.device_id}.log"
        config: dict[str, Any] = {
            "device_id": self.device_id, "shutdown_grace_s": 5.0,
            "state_dir": str(workdir / f"state-{self.device_id}"),
            "mqtt": {"port": broker_port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
            "model": {"path": str(model), "max_new_tokens": 64},
        }
        self.data = apply_overrides(config, overrides)
        self.config.write_text(to_toml(self.data))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def request_topic(self) -> str:
        return f"{self.prefix}/{self.device_id}/request"

    @property
    def response_topic(self) -> str:
        return f"{self.prefix}/{self.device_id}/response"

    @property
    def status_topic(self) -> str:
        return f"{self.prefix}/{self.device_id}/status"

    def start(self, watcher: Client, wait_ready: bool = True) -> None:
        watcher.subscribe(self.status_topic)
        self._spawn()
        if wait_ready:
            watcher.wait_for(lambda d: d.get("device_id") == self.device_id and d.get("state") == "ready",
                             READY_TIMEOUT_S)

    def _spawn(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with self.log_path.open("ab") as log_file:  # appended: one log across restarts
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(self.config)],
                                         stdout=log_file, stderr=subprocess.STDOUT, env=env)

    def restart(self, sig: int = signal.SIGKILL, wait_ready: bool = True) -> None:
        """Stop with `sig` (a crash by default), then start the same device again: same
        settings, same state_dir. Readiness is read from the log (`agent.ready`), which works
        while the broker is away and is never fooled by the previous process's retained status."""
        if self.proc is not None and self.proc.poll() is None:
            self.stop(sig)
        before = self.count_events("agent.ready")
        self._spawn()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while wait_ready and self.count_events("agent.ready") <= before:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited with {self.proc.returncode} while starting")
            if time.monotonic() > deadline:
                raise TimeoutError("the restarted agent did not become ready")
            time.sleep(0.05)

    def count_events(self, event: str) -> int:
        return sum(1 for line in self.log_lines() if line.get("event") == event)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def rewrite(self, **overrides: Any) -> None:
        """Change the settings file the way config managers do: write a temp file, rename it."""
        self.data = apply_overrides(self.data, overrides)
        temp = self.config.with_name(f".{self.config.name}.tmp")
        temp.write_text(to_toml(self.data))
        os.replace(temp, self.config)

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines


def running_agent(folder: Path, port: int, model: Path, **overrides: Any) -> Iterator[AgentProcess]:
    """For a fixture: an agent started and ready on the broker at `port`; stopped at teardown."""
    watcher = Client(port)
    agent = AgentProcess(folder, port, model, **overrides)
    agent.start(watcher)
    watcher.close()
    yield agent
    agent.stop()


def answers_client(port: int, agent: AgentProcess, nodelay: bool = False) -> Iterator[Client]:
    """For a fixture: a client subscribed to the agent's answers; closed at teardown.
    `nodelay`: without it Nagle holds each request behind the PUBACK sent just before (+40 ms)."""
    c = Client(port)
    if nodelay:
        c.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.subscribe(agent.response_topic)
    yield c
    c.close()


def apply_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy with `section__name=value` set inside a table and `name=value` at the top."""
    result = json.loads(json.dumps(config))
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            result.setdefault(section, {})[name] = value
        else:
            result[key] = value
    return result


def to_toml(data: dict[str, Any], table: str = "") -> str:
    """Enough TOML for test settings: scalars and lists first, then nested tables."""
    def value(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else json.dumps(v)

    scalars = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out = ([f"[{table}]"] if table and scalars else []) + scalars
    for key, sub in data.items():
        if isinstance(sub, dict):
            out.append(to_toml(sub, f"{table}.{key}" if table else key))
    return "\n".join(out) + "\n"


def tree_rss_bytes(pid: int, key: str = "VmRSS") -> int:
    """Resident memory of a process and its children: the daemon and its inference process,
    which holds the model. `key` VmHWM: each one's peak."""
    return _tree_kb(pid, "status", key) * 1024


def tree_pss_bytes(pid: int) -> int:
    """Like tree_rss_bytes, but each shared page split among the processes that map it: the
    daemon and its child both map libpython, libc and more, which Rss counts twice."""
    return _tree_kb(pid, "smaps_rollup", "Pss") * 1024


def _tree_kb(pid: int, proc_file: str, key: str) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for member in [pid, *map(int, children)]:
        for line in Path(f"/proc/{member}/{proc_file}").read_text().splitlines():
            if line.startswith(key + ":"):
                total += int(line.split()[1])
    return total


DOOR_SCHEMA = {"type": "json_schema", "json_schema": {"name": "door", "schema": {
    "type": "object", "properties": {"open": {"type": "boolean"}}, "required": ["open"]}}}


def file_camera(clip: Path, motion: bool = False) -> dict[str, Any]:
    return {"source": str(clip), **({"motion": {"enabled": True, "off_delay_s": 1.0}} if motion else {})}


def collect(client: Client, seconds: float) -> list[tuple[float, str, bytes]]:
    """Every message that arrives within `seconds`: (arrival time, topic, payload)."""
    out, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            topic, payload, _ = client.messages.get(timeout=left)
        except queue.Empty:
            break
        out.append((time.monotonic(), topic, payload))
    return out


def first(client: Client, topic: str, timeout: float = 60) -> tuple[float, bytes]:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            got, payload, _ = client.messages.get(timeout=left)
        except queue.Empty:
            break
        if got == topic:
            return time.monotonic(), payload
    raise TimeoutError(f"nothing on {topic}")


def ask(client: Client, agent: AgentProcess, request: dict[str, Any], timeout: float = ANSWER_TIMEOUT_S,
        topic: str | None = None) -> dict[str, Any]:
    """A pipeline's request: publish it (an id is added when it has none) and wait for the
    answer with that id on the topics `client` subscribed to (other messages are dropped)."""
    rid = request.setdefault("id", uuid.uuid4().hex)
    client.publish(topic or agent.request_topic, json.dumps(request))
    return client.wait_for(lambda d: d.get("id") == rid, timeout)


def next_stats(port: int, agent: AgentProcess, timeout: float = 10) -> dict[str, Any]:
    """The agent's next stats document (give the agent a short `stats_interval_s`)."""
    reader = Client(port)
    try:
        reader.subscribe(f"{agent.prefix}/{agent.device_id}/stats")
        return reader.wait_for(lambda d: "uptime_s" in d, timeout)
    finally:
        reader.close()


def retained_status(port: int, agent: AgentProcess) -> dict[str, Any]:
    """The agent's retained status document, as a newcomer reads it."""
    reader = Client(port)
    try:
        reader.subscribe(agent.status_topic)
        return reader.wait_for(lambda d: d.get("device_id") == agent.device_id, 10)
    finally:
        reader.close()
