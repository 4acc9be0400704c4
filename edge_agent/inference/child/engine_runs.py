"""Requests on the runtime's batching engine (og.Engine): started as turns, stepped through the
engine's event buffer, cancelled and expired one by one. The Core decides which request comes
here; this module only keeps the engine's side of them. og.Engine calls stay on the thread that
made it (the child's main loop)."""

from __future__ import annotations

from typing import Any

import onnxruntime_genai as og

from edge_agent.inference.child.run import Run
from edge_agent.inference.types import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP

Event = tuple[str, int, Any]
EVENT_BUFFER = 256


class EngineRuns:
    def __init__(self, og_engine: Any) -> None:
        self._engine = og_engine
        self._runs: dict[int, Run] = {}  # rid -> run on the engine
        self._by_request: dict[int, Run] = {}  # id(og.Request) -> run, until its last event
        self._buffer = og_engine.create_event_buffer(EVENT_BUFFER) if og_engine is not None else None

    def __bool__(self) -> bool:
        return bool(self._runs)

    def __len__(self) -> int:
        return len(self._runs)

    def live(self) -> list[Run]:
        return list(self._runs.values())

    def start(self, run: Run, request: Any, turn: Any) -> None:
        run.request, run.turn = request, turn
        self._runs[run.rid] = run
        self._by_request[id(request)] = run

    def cancel(self, rid: int) -> Run | None:
        """Ends it now; its CANCELLED event later only closes its request."""
        run = self._runs.pop(rid, None)
        if run is not None:
            run.finish = FINISH_CANCELLED
            run.request.cancel_turn(run.turn)
        return run

    def expire(self, now: float) -> list[Run]:
        expired = [run for run in self._runs.values() if run.expired(now)]
        for run in expired:
            del self._runs[run.rid]
            run.request.cancel_turn(run.turn)
        return expired

    def clear(self) -> None:
        """The runtime failed where no request could be blamed: cancel what it still runs."""
        for run in self._runs.values():
            try:
                run.request.cancel_turn(run.turn)
            except Exception:  # noqa: BLE001 - already failing; the child goes on for new work
                pass
        self._runs.clear()

    def step(self, eos_ids: frozenset[int]) -> list[Event]:
        if self._buffer is not None and self._engine.has_pending_requests():
            return self._read(eos_ids)
        if self._runs:  # never seen; without this the loop would spin on them for ever
            lost, self._runs = self._runs, {}
            return [("failed", rid, "the batching engine lost the request") for rid in lost]
        return []

    def _read(self, eos_ids: frozenset[int]) -> list[Event]:
        events: list[Event] = []
        for ev in self._engine.run(self._buffer):
            run = self._by_request.get(id(ev.request))
            if run is None:
                continue
            flags = ev.flags
            ended = run.rid not in self._runs  # cancelled or expired: only close it
            if flags & og.EngineEventFlags.TOKEN and not ended:
                piece = run.take(int(ev.token), eos_ids)
                if piece is not None and run.work.stream:
                    events.append(("token", run.rid, piece))
            if flags & (og.EngineEventFlags.TURN_FINISHED | og.EngineEventFlags.FAILED):
                events.extend(self._end(run, ev, ended))
        return events

    def _end(self, run: Run, ev: Any, ended: bool) -> list[Event]:
        self._by_request.pop(id(run.request), None)
        run.request.close()
        if ended:
            return []
        del self._runs[run.rid]
        if ev.flags & og.EngineEventFlags.FAILED:
            return [("failed", run.rid, f"the batching engine failed this request (error {ev.error_code})")]
        reason = ev.finish_reason
        finish = FINISH_STOP if reason in (og.FinishReason.EOS, og.FinishReason.STOP_STRING) else FINISH_LENGTH
        if reason == og.FinishReason.CANCELLED:
            finish = FINISH_CANCELLED
        return [("done", run.rid, run.result(finish))]
