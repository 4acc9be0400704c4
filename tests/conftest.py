from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from support import AgentProcess, Broker, Client, build_model
from video import UdpStream, running_stream

# Tests that load the runtime themselves (not through the agent's inference package, which
# switches it off) must not queue usage events for Microsoft either (README: What leaves the box).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return build_model("tiny")


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    return build_model("smollm2")


@pytest.fixture(scope="module")
def vision_model() -> Path:
    return build_model("tiny-vision")


def _running_broker() -> Iterator[Broker]:
    server = Broker()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """The mosquitto most tests share."""
    yield from _running_broker()


@pytest.fixture(scope="module")
def module_broker() -> Iterator[Broker]:
    """A mosquitto of the module's own: its retained messages and sessions stay there."""
    yield from _running_broker()


@pytest.fixture
def own_broker() -> Iterator[Broker]:
    """A mosquitto of the test's own, to stop, restart or forget."""
    yield from _running_broker()


@pytest.fixture
def stream() -> Iterator[UdpStream]:
    """A live video stream of the test's own, to kill or pause."""
    yield from running_stream()


@pytest.fixture
def client(broker: Broker) -> Iterator[Client]:
    c = Client(broker.port)
    yield c
    c.close()


@pytest.fixture
def start_agent(tmp_path: Path, tiny_model: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start agents (tiny model unless `model=` is given); all are stopped at teardown."""
    started: list[AgentProcess] = []

    def start(broker: Broker, watcher: Client, model: Path | None = None, wait_ready: bool = True,
              **overrides: Any) -> AgentProcess:
        agent = AgentProcess(tmp_path, broker.port, model or tiny_model, **overrides)
        started.append(agent)
        agent.start(watcher, wait_ready=wait_ready)
        return agent

    yield start
    for agent in started:
        if agent.proc and agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()
