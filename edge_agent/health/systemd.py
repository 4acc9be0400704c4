"""What the daemon tells systemd: READY/RELOADING/STOPPING and watchdog pings (sd_notify)."""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

from edge_agent.log import get_logger

log = get_logger("health")
# Budget for a reload that loads a new model: the main loop, which sends the pings, waits for
# the load, so they come from a helper thread meanwhile, for at most this long (the unit's
# TimeoutStartSec). It checks progress a few times a ping interval, so a ping is never late.
RELOAD_WATCHDOG_S = 600.0
RELOAD_CHECKS_PER_PING = 4


class SystemdNotifier:
    """The sd_notify(3) protocol: newline-separated KEY=VALUE datagrams to $NOTIFY_SOCKET (a
    path, or '@name' for the abstract namespace). Every call is a no-op when not run by
    systemd; a failed send is logged, never raised (systemd is told, not asked)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _notify_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_s = _watchdog_seconds(env) if self._address else None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """WatchdogSec= in seconds when systemd expects pings from this process, else None."""
        return self._watchdog_s

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        # systemd 253+ (Type=notify-reload) matches the reload to this timestamp.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.send(*_status(text))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def send(self, *fields: str) -> bool:
        if self._address is None or not fields:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(fields).encode("utf-8"), self._address)
        except OSError as exc:
            log.warning("systemd.notify_failed", error=str(exc), message=fields[0])
            return False
        return True


def _notify_address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode("utf-8")
    return value if value.startswith("/") else None  # vsock: and others are not for us


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):  # meant for another process (we were forked off)
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


def _status(text: str | None) -> tuple[str, ...]:
    return (f"STATUS={' '.join(text.split())}",) if text else ()


class SystemdService:
    """The daemon as systemd sees it, driven by the main loop's `tick`: READY=1 once the agent
    can really answer, and a watchdog ping every half WatchdogSec= only while `progressing()`
    says the MQTT network thread and the inference worker both make progress. A wedged part
    (or a wedged main loop) stops the pings, and systemd restarts the service."""

    def __init__(self, notifier: SystemdNotifier, progressing: Callable[[], bool],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._notifier = notifier
        self._progressing = progressing
        self._clock = clock
        interval = notifier.watchdog_interval()
        self.ping_every_s = interval / 2 if interval else None
        self._next_ping = 0.0
        self._withheld = False
        self.ready_sent = False

    def tick_s(self, default: float) -> float:
        """How long the main loop may sleep between ticks."""
        return min(default, self.ping_every_s) if self.ping_every_s else default

    def tick(self, serving: bool, status: str | None = None) -> None:
        """`serving`: model loaded and warmed up, worker running, broker connected."""
        if serving and not self.ready_sent:
            log.info("systemd.ready", notify=self._notifier.enabled)  # logged first: READY is the fact
            self._notifier.ready(status)
            self.ready_sent = True
        self._ping_if_due()

    def _ping_if_due(self) -> None:
        if self.ping_every_s is None:
            return
        now = self._clock()
        if now < self._next_ping:
            return
        if not self._progressing():
            if not self._withheld:
                log.error("watchdog.withheld", reason="a part stopped making progress")
                self._withheld = True
            return
        if self._withheld:
            log.info("watchdog.resumed")
            self._withheld = False
        self._notifier.watchdog()
        self._next_ping = now + self.ping_every_s

    @contextmanager
    def reloading(self, budget_s: float = RELOAD_WATCHDOG_S) -> Iterator[None]:
        """RELOADING=1 ... READY=1 around a reload. The main loop, which sends the pings, waits
        for the reload (a new model may take minutes to load), so a helper thread sends them
        meanwhile, on the same terms: only while `progressing()`, and for at most `budget_s`
        (a reload stuck past that stops them). Never a stretched WATCHDOG_USEC: that would
        vouch for minutes ahead, and a part that wedged meanwhile would go unnoticed."""
        if self.ready_sent:  # before READY=1, systemd is still waiting for start-up
            self._notifier.reloading("reloading settings")
        done, pinger = threading.Event(), None
        if self.ping_every_s:
            pinger = threading.Thread(target=self._ping_while_reloading, args=(done, budget_s),
                                      name="watchdog-reload", daemon=True)
            pinger.start()
        try:
            yield
        finally:
            done.set()
            if pinger is not None:
                pinger.join()
            if self.ready_sent:
                self._notifier.ready("ready")

    def _ping_while_reloading(self, done: threading.Event, budget_s: float) -> None:
        assert self.ping_every_s is not None
        until = self._clock() + budget_s
        while not done.is_set():
            if self._clock() >= until:
                log.error("watchdog.withheld", reason="the reload ran past its budget", budget_s=budget_s)
                return
            self._ping_if_due()
            done.wait(self.ping_every_s / RELOAD_CHECKS_PER_PING)

    def stopping(self) -> None:
        self._notifier.stopping("stopping")
