"""The requests accepted and not yet answered, by id: what a cancel can reach."""

from __future__ import annotations

import threading

from edge_agent.work.jobs import Job


class InFlight:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}

    def add(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.request.id] = job

    def forget(self, job: Job) -> None:
        """Answered (or refused): a later cancel of its id finds nothing."""
        with self._lock:
            if self._jobs.get(job.request.id) is job:
                del self._jobs[job.request.id]

    def cancel(self, request_id: str) -> bool:
        """End that request, queued or running; False when no such request is in flight."""
        with self._lock:
            job = self._jobs.get(request_id)
        if job is None:
            return False
        job.cancel()
        return True
