"""One immutable snapshot of the settings and the parts made from them. A reload builds a new
one and swaps it in one assignment; a request or rule run reads one snapshot from start to end
(its job keeps the runner it was accepted with), so it never sees half of a reload."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from edge_agent.mqtt import BrokerLink

from edge_agent.protocol import RequestLimits, Topics
from edge_agent.settings.model import Settings
from edge_agent.work.handler import RequestHandler
from edge_agent.work.overflow import Overflow


@dataclass(frozen=True)
class Snapshot:
    settings: Settings
    topics: Topics
    limits: RequestLimits
    link: BrokerLink
    handler: RequestHandler  # runs the local lane's jobs (its engine: the local model or a server)
    overflow: Overflow | None
    loaded: bool = False  # the model is loaded and warmed up: the local lane takes requests


Current = Callable[[], Snapshot]
