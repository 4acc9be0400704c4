"""What the running agent shows of itself: the live figures for the metrics, the status's and
stats' views of the work and the parts, and how many requests generate at once. Read-only:
each reads the current snapshot once and the parts' own counters; nothing here changes state."""

from __future__ import annotations

from typing import Any, Protocol

from edge_agent.health.metrics import Live, RemoteServer
from edge_agent.inference.openai_client import OpenAIServer
from edge_agent.work.snapshot import Snapshot



class Agent(Protocol):
    """The parts of the daemon's Agent these views read."""

    snapshot: Snapshot
    scheduler: Any
    status: Any
    delivery: Any
    intake: Any
    cameras: Any
    watcher: Any
    history: Any


def max_batch(snapshot: Snapshot) -> int:
    """Requests generating at once: the setting, else 8 on CPU and 16 on an accelerator
    (a remote server: openai.max_in_flight)."""
    settings = snapshot.settings
    configured = settings.inference.max_batch
    if settings.model.backend == "openai":
        return configured or settings.openai.max_in_flight
    return configured or (8 if snapshot.handler.engine.provider in ("cpu", "") else 16)


def batching_status(snapshot: Snapshot) -> dict[str, object]:
    engine = snapshot.handler.engine
    return {"batching": engine.batching, "batching_reason": engine.batching_reason,
            "max_batch": max_batch(snapshot), "backend": snapshot.settings.model.backend}


def live_metrics(agent: Agent) -> Live:
    snapshot, scheduler = agent.snapshot, agent.scheduler
    engine = snapshot.handler.engine
    remote = [RemoteServer(server.role, server.outcomes(), server.breaker.state() == "open")
              for server in (engine if isinstance(engine, OpenAIServer) else None,
                             snapshot.overflow.server if snapshot.overflow is not None else None)
              if server is not None]
    return Live(ready=agent.status.state == "ready", broker_connected=snapshot.link.connected,
                queue_depth=scheduler.depth, requests_running=scheduler.running,
                outbox_messages=agent.delivery.stats().get("outbox"), model=engine.name,
                provider=engine.provider, batching=str(getattr(engine, "batching", False)).lower(),
                inference_pid=getattr(engine, "pid", None), inference_restarts=engine.crashes,
                fleet_handed_back=agent.intake.handed_back, cameras=agent.cameras.info(),
                watch=agent.watcher.info(), remote=remote, memory=getattr(engine, "memory", None),
                cache_reserved_bytes=getattr(engine, "reserved_bytes", 0))


def work_info(agent: Agent) -> dict[str, Any]:
    snapshot, scheduler = agent.snapshot, agent.scheduler
    return {"queue_depth": scheduler.depth, "busy_rejected": scheduler.rejected, "in_flight": scheduler.running,
            "delivery": agent.delivery.stats(), "inference_restarts": snapshot.handler.engine.crashes,
            **parts_info(agent, snapshot),
            "fleet": agent.intake.fleet_info() if snapshot.settings.mqtt.shared_group else None}


def parts_info(agent: Agent, snapshot: Snapshot) -> dict[str, Any]:
    """Watch rules, the history, the remote backend, the overflow server and the memory plan:
    in the status and stats."""
    engine = snapshot.handler.engine
    memory = getattr(engine, "memory", None)
    return {"watch": agent.watcher.info(),
            "history": agent.history.info() if snapshot.settings.history.enabled else None,
            "remote": engine.info() if isinstance(engine, OpenAIServer) else None,
            "overflow": snapshot.overflow.info() if snapshot.overflow is not None else None,
            "memory": memory.summary(engine.reserved_bytes, engine.loaded_bytes) if memory is not None else None}
