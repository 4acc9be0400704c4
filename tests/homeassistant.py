"""A real Home Assistant for the tests, as the consumer of our MQTT discovery payloads.

`homeassistant==2025.1.4` is the last release for Python 3.12 (FACTS.md); its MQTT integration
pins paho-mqtt 1.6.1, so it gets its own 3.12 venv, built once under
~/.cache/edge-agent/homeassistant-2025.1.4/ ($EDGE_AGENT_HA_CACHE overrides) behind a file lock,
so parallel test processes build it once. `HomeAssistant` runs `hass --skip-pip` against a broker
port, with the MQTT integration at debug level: its log is what the tests read.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from support import free_port

HA_VERSION = "2025.1.4"
# Without the frontend package HA falls into recovery mode, which sets up no config entry: its
# MQTT never starts properly (no birth message), though the log looks half alive.
HA_REQUIREMENTS = (f"homeassistant=={HA_VERSION}", "paho-mqtt==1.6.1", "home-assistant-frontend==20250109.2")
BUILD_TIMEOUT_S = 900.0
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0

CONFIGURATION = """\
homeassistant:
  name: edge-agent test
  time_zone: UTC
  unit_system: metric
http:
  server_host: 127.0.0.1
  server_port: {http_port}
logger:
  default: warning
  logs:
    # discovery: "Found new component", errors, "Removing component"
    homeassistant.components.mqtt: debug
    # "Registered new <platform>.mqtt entity": only for components HA accepted
    homeassistant.helpers.entity_registry: debug
    # every state_changed event with the new state: how a test sees what HA made of a message
    homeassistant.core: debug
"""

# Run in HA's venv: HA's own code expands the abbreviations and validates each component with
# its platform's strict schema (the discovery schema silently drops keys it does not know).
VALIDATE = """
import importlib, json, logging, sys
import voluptuous as vol
from homeassistant.components.mqtt import discovery
from homeassistant.components.mqtt.schemas import DEVICE_DISCOVERY_SCHEMA
logging.disable(logging.CRITICAL)  # HA warns about validating outside its event loop
payload = json.load(sys.stdin)
discovery._replace_all_abbreviations(payload)
DEVICE_DISCOVERY_SCHEMA(payload)
out = {}
for cid, comp in payload["components"].items():
    platform = comp.pop("platform")
    if not comp:
        out[cid] = "removed"
        continue
    comp = discovery.MQTTDiscoveryPayload(comp, device=payload["device"], origin=payload["origin"])
    discovery._merge_common_device_options(comp, payload)
    schema = importlib.import_module("homeassistant.components.mqtt." + platform).PLATFORM_SCHEMA_MODERN
    try:
        schema(dict(comp))
        out[cid] = "ok"
    except vol.Invalid as exc:
        out[cid] = str(exc)
print(json.dumps(out))
"""

# What HA logs when it refuses a discovery document or one of its components.
DISCOVERY_ERRORS = (r"when processing MQTT discovery message|Invalid MQTT device discovery payload"
                    r"|Unable to parse JSON")
# HA's text entity can be set offline (no API token) only by an automation: this one sets it
# from each MQTT message on `topic`, as a user typing would.
PROMPT_AUTOMATION = """
automation:
  - alias: set prompt
    triggers:
      - trigger: mqtt
        topic: {topic}
    actions:
      - action: text.set_value
        target:
          entity_id: {entity_id}
        data:
          value: "{{{{ trigger.payload }}}}"
"""


def cache_dir() -> Path:
    env = os.environ.get("EDGE_AGENT_HA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edge-agent" / f"homeassistant-{HA_VERSION}"


def find_python312() -> str | None:
    """pyenv's newest 3.12.x (as scripts/test-pythons.sh finds it), else python3.12 on PATH."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    found = sorted((p for p in root.glob("versions/3.12.*") if re.fullmatch(r"3\.12\.\d+", p.name)),
                   key=lambda p: int(p.name.split(".")[2]))
    if found and (found[-1] / "bin" / "python").exists():
        return str(found[-1] / "bin" / "python")
    return shutil.which("python3.12")


def ensure_venv() -> tuple[Path, float]:
    """(the venv's `hass`, seconds spent building it now: 0.0 when it was there already).
    RuntimeError when no Python 3.12 is found or pip fails."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    venv, stamp = root / "venv", root / "venv" / ".edge-agent-installed"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here for the first's build
        wanted = json.dumps({"requirements": HA_REQUIREMENTS})
        if stamp.exists() and stamp.read_text() == wanted:
            return venv / "bin" / "hass", 0.0
        python = find_python312()
        if python is None:
            raise RuntimeError("no Python 3.12 found (pyenv or python3.12 on PATH)")
        started = time.monotonic()
        if not (venv / "bin" / "python").exists():
            subprocess.run([python, "-m", "venv", str(venv)], check=True)
        pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                              "--disable-pip-version-check", *HA_REQUIREMENTS],
                             capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if pip.returncode != 0:
            raise RuntimeError(f"pip install of Home Assistant failed:\n{pip.stderr[-4000:]}")
        stamp.write_text(wanted)
        return venv / "bin" / "hass", time.monotonic() - started


def hass_or_skip() -> Path:
    """The venv's `hass` (built now if need be); the calling test is skipped where no Python 3.12
    is found."""
    try:
        return ensure_venv()[0]
    except RuntimeError as exc:
        if "no Python 3.12" in str(exc):
            pytest.skip(str(exc))
        raise


def validate(hass: Path, payload: dict) -> dict[str, str]:
    """Component id -> "ok", "removed" or HA's complaint, from HA's own schemas (no hass runs).
    vol.Invalid on the device part comes back as a failed process (RuntimeError)."""
    python = hass.parent / "python"
    done = subprocess.run([str(python), "-c", VALIDATE], input=json.dumps(payload), capture_output=True,
                          text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"HA refused the device part:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


class HomeAssistant:
    """One `hass` process with a fresh config folder, MQTT set up as a config entry (discovery on,
    prefix `homeassistant`). Read its log with `wait_for`; `mark()` says where "from now" is."""

    def __init__(self, hass: Path, broker_port: int, extra_config: str = "") -> None:
        """`extra_config`: YAML appended to configuration.yaml (automations, say)."""
        self.hass = hass
        self.broker_port = broker_port
        self.extra_config = extra_config
        self.dir = Path(tempfile.mkdtemp(prefix="hass-"))
        self.log_path = self.dir / "test-output.log"
        self.http_port = free_port()  # its web server: entity pictures (/api/image_proxy/...)
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    def _write_config(self) -> None:
        (self.dir / "configuration.yaml").write_text(CONFIGURATION.format(http_port=self.http_port)
                                                      + self.extra_config)
        storage = self.dir / ".storage"
        storage.mkdir()
        entry = {
            "entry_id": "edgeagenttestmqtt0000000000000", "version": 1, "minor_version": 2,
            "domain": "mqtt", "title": "test broker", "source": "user", "unique_id": None,
            "data": {"broker": "127.0.0.1", "port": self.broker_port},
            "options": {"discovery": True, "discovery_prefix": "homeassistant"},
            "pref_disable_new_entities": False, "pref_disable_polling": False,
            "disabled_by": None, "discovery_keys": {},
            "created_at": "2025-01-01T00:00:00+00:00", "modified_at": "2025-01-01T00:00:00+00:00",
        }
        (storage / "core.config_entries").write_text(json.dumps(
            {"version": 1, "minor_version": 4, "key": "core.config_entries", "data": {"entries": [entry]}}))

    def start(self, timeout: float = START_TIMEOUT_S) -> float:
        """Start and wait for HA's MQTT birth message (sent once HA has started and discovery's
        subscriptions are done); returns the seconds it took."""
        started = time.monotonic()
        with open(self.log_path, "wb") as out:
            # Its own process group: stop() must reach the workers hass may fork.
            self.proc = subprocess.Popen([str(self.hass), "-c", str(self.dir), "--skip-pip"],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_for(r"MQTT client initialized, birth message sent", timeout=timeout)
        except BaseException:
            self.stop()  # a caller whose start failed has nothing to close
            raise
        return time.monotonic() - started

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def mark(self) -> int:
        """The log's length now: pass it as `since` to look only at what comes after."""
        return len(self.log())

    def lines(self, pattern: str, since: int = 0) -> list[str]:
        return [line for line in self.log()[since:].splitlines() if re.search(pattern, line)]

    def wait_for(self, pattern: str, *, since: int = 0, count: int = 1,
                 timeout: float = 30.0) -> list[str]:
        """The first `count` log lines after `since` matching `pattern`; TimeoutError naming
        the log's tail otherwise (or at once if hass exited)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.lines(pattern, since)
            if len(found) >= count:
                return found[:count]
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"hass exited ({self.proc.returncode}):\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(found)}/{count} lines match {pattern!r}; log tail:\n"
                                   f"{self.log()[since:][-4000:]}")
            time.sleep(0.1)

    def wait_state(self, entity_id: str, state: str, *, since: int = 0, timeout: float = 30.0) -> str:
        """The state_changed line where `entity_id` took `state` (as HA's log writes it)."""
        return self.wait_for(r"state_changed\[L\]: entity_id=" + re.escape(entity_id) + ", .*new_state=<state "
                             + re.escape(f"{entity_id}={state}") + "[;@ ]", since=since, timeout=timeout)[0]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
