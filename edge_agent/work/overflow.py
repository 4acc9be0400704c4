"""Overflow: a remote OpenAI-compatible server that takes the requests the local model cannot —
those that find the queue full (`busy`), and those that come while the local model loads
(`unloaded`) — with its own bounded queue and workers, so it never slows the local lane.
A request the settings keep local (camera frames and images unless `allow_images`, templates
unless `allow_templates`) never goes there."""

from __future__ import annotations

from typing import Any, Callable

from edge_agent.work.handler import RequestHandler
from edge_agent.work.jobs import Job, run
from edge_agent.log import get_logger
from edge_agent.inference.openai_client import OpenAIServer
from edge_agent.protocol import Request
from edge_agent.work.lanes import Scheduler
from edge_agent.settings.remote import OverflowSettings

log = get_logger("overflow")


class Overflow:
    def __init__(self, settings: OverflowSettings, handler_for: Callable[[OpenAIServer], RequestHandler]) -> None:
        self.settings = settings
        self.server = OpenAIServer(settings, role="overflow")
        self.handler = handler_for(self.server)
        # Its queue holds as many as it runs: past that, a request is answered `busy` as before.
        self.scheduler = Scheduler(settings.max_in_flight, run, settings.max_in_flight)
        self.sent = {"busy": 0, "unloaded": 0}

    def start(self) -> None:
        self.server.load()
        self.scheduler.start()

    def stop(self, grace_s: float) -> list[Job]:
        pending = self.scheduler.stop(grace_s)
        self.server.close()
        return pending

    def refusal(self, request: Request, reason: str) -> str | None:
        """Why this request may not go to the server for `reason`; None when it may."""
        if reason not in self.settings.when:
            return f"overflow.when has no {reason!r}"
        if request.image_count and not self.settings.allow_images:
            return "it carries camera frames or images (overflow.allow_images = false)"
        if request.template is not None and not self.settings.allow_templates:
            return "it is made from a template (overflow.allow_templates = false)"
        return None

    def submit(self, job: Job, reason: str) -> bool:
        if self.refusal(job.request, reason) is not None:
            return False
        local_runner, job.runner = job.runner, self.handler
        if not self.scheduler.submit(job):
            job.runner = local_runner
            return False
        self.sent[reason] += 1
        log.info("request.overflow", reason=reason, url=self.server.url, queue_depth=self.scheduler.depth)
        return True

    def info(self) -> dict[str, Any]:
        return {**self.server.info(), "when": list(self.settings.when), "sent": dict(self.sent),
                "in_flight": self.scheduler.running, "queue_depth": self.scheduler.depth}
