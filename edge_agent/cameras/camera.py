"""The only module that imports cv2 for capture: cameras, their capture threads, the camera set.

Where the frame comes from. `continuous` mode: one thread per camera grabs every frame as the
source delivers it, so no buffer in FFmpeg or the V4L2 driver fills up, and keeps only the latest
(with its capture time and sequence number). A grab demuxes and decodes (FFmpeg) or dequeues
(V4L2); a frame is converted to BGR ("retrieved") only when a request waits for one, so an idle
camera costs what decoding its stream costs. With motion enabled, a frame is also retrieved when a
look is due (at most `motion.fps` a second) and handed to motion.py; being the newest, it serves
requests too. `on_demand` mode: the same thread runs only while a request needs frames: it opens
the source, lets the frames buffered while opening go by (and a few more for a USB camera's
auto-exposure), hands over a frame and closes. It costs nothing between requests, but each
request pays the open: ≈1.7 s on an FFmpeg network stream while it probes.
bench/CAMERA.md has the measured figures: on a 640x480 15 fps MPEG-2 stream the continuous mode
costs what a bare `cap.grab()` loop costs (a little less than a `cap.read()` loop). A frame's age
counts from its grab: what the sender and FFmpeg held back before that (2-4 frames) is not in it.

A request never waits on a read: it waits on a condition, at most `fresh_wait_ms`, and a camera
whose reads stopped (reconnecting, or a read hung past `read_timeout_s`) answers CameraUnavailable
at once. A failing camera is reopened by its own thread with capped, jittered back-off.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator

from edge_agent.cameras.opencv_env import v4l_timeout  # before cv2: OpenCV reads its settings at load
import cv2
import numpy as np

from edge_agent.errors import BadRequest, CameraUnavailable, ConfigError, StaleFrame
from edge_agent.log import get_logger
from edge_agent.settings.model import CameraSettings
from edge_agent.backoff import backoff_delay
from edge_agent.cameras.motion import MotionListener, MotionWatch
from edge_agent.settings.base import redact
from edge_agent.settings.sources import source_kind, source_problems

log = get_logger("camera")

DEFAULT_FPS = 15.0  # pacing of a file, and drain threshold, when the source does not say
# After an open, FFmpeg hands back the frames it buffered while probing (≈1.5 s) back to back:
# they are stale, so grabs are dropped until one waits for the source (a quarter frame interval).
DRAIN_BLOCK_FRACTION = 0.25
DRAIN_MAX_S = 3.0
ON_DEMAND_SKIP = 2  # grabs skipped after an on-demand open (auto-exposure of USB cameras)
FPS_WINDOW_S = 2.0
FAILED_AFTER = 5  # consecutive failed opens before the state says "failed" (retries go on)
WATCHDOG_GRACE_S = 1.0  # past read_timeout_s + this without a frame, a read counts as hung
WAIT_SLICE_S = 0.25  # waiting requests re-check the camera state this often
ROTATIONS = {90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}


@dataclass(frozen=True, eq=False)
class Frame:
    camera: str
    image: np.ndarray  # BGR, sized and rotated as configured
    captured_at: float  # time.time() when it was grabbed
    captured_mono: float  # time.monotonic() when it was grabbed
    seq: int  # frames this camera has grabbed so far
    width: int
    height: int

    def age_ms(self, now_mono: float | None = None) -> float:
        return ((time.monotonic() if now_mono is None else now_mono) - self.captured_mono) * 1000.0


class _CaptureFailed(Exception):  # the source could not be opened or read; says why, never the URL
    pass


# --- sources ---------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def has_gstreamer() -> bool:
    found = re.search(r"GStreamer:\s*(\w+)", cv2.getBuildInformation())
    return bool(found) and found[1].upper() == "YES"


def _open(s: CameraSettings, kind: str) -> cv2.VideoCapture:
    try:
        if kind == "v4l2":
            v4l_timeout.want(s.read_timeout_s, fix=True)  # no per-capture timeout: see opencv_env
            cap = cv2.VideoCapture(int(s.source) if str(s.source).isdigit() else s.source, cv2.CAP_V4L2)
            for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, s.width), (cv2.CAP_PROP_FRAME_HEIGHT, s.height),
                                (cv2.CAP_PROP_FPS, s.fps)):
                if value and cap.isOpened():
                    cap.set(prop, value)
        elif kind == "gstreamer":
            cap = cv2.VideoCapture(str(s.source), cv2.CAP_GSTREAMER)
        else:
            cap = cv2.VideoCapture(str(s.source), cv2.CAP_FFMPEG,
                                   [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(s.open_timeout_s * 1000),
                                    cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(s.read_timeout_s * 1000)])
    except cv2.error as exc:
        raise _CaptureFailed(f"cannot open the {kind} source: {exc.err}") from exc
    if not cap.isOpened():
        cap.release()
        raise _CaptureFailed(f"cannot open the {kind} source")
    return cap


# --- one camera ------------------------------------------------------------------------------
class Camera:
    def __init__(self, name: str, settings: CameraSettings) -> None:
        problems = source_problems(name, settings, has_gstreamer())
        if problems:
            raise ConfigError(problems)
        self.name, self.settings, self.kind = name, settings, source_kind(settings.source)
        self._cond = threading.Condition()
        self._frame: Frame | None = None  # the latest retrieved frame; nothing older is kept
        self._seq, self._dropped, self._reconnects = 0, 0, 0
        self._last_grab: float | None = None
        self._grabs: deque[float] = deque(maxlen=512)  # grab times, for the fps
        self._wants: list[float] = []  # capture times that waiting requests need a frame at or after
        self._state, self._error = "idle", ""
        self._run_id = 0  # a thread of an older run (stuck in a read when stopped) publishes nothing
        self._interval = 1.0 / DEFAULT_FPS  # between frames of the source, once it is open
        self._stop, self._users, self._users_lock = threading.Event(), 0, threading.Lock()  # users: see _in_use
        self._thread: threading.Thread | None = None
        watching = settings.motion.enabled and settings.mode == "continuous"
        self._motion = MotionWatch(name, settings.motion, zones=settings.zones) if watching else None

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Continuous mode: start the capture thread (returns at once). On demand: nothing."""
        if self.settings.mode == "continuous":
            self._launch()

    def stop(self) -> None:
        self.signal_stop()
        self.join()

    def signal_stop(self) -> None:
        """Ask the capture thread to end; waiting requests get CameraUnavailable."""
        self._stop.set()
        with self._cond:
            self._run_id += 1
            self._state, self._frame = "idle", None
            self._cond.notify_all()
        if self._motion is not None:
            self._motion.clear("camera stopped")

    def join(self) -> None:
        """Wait for the thread; one stuck in a hung read is left behind (a daemon)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(self.settings.read_timeout_s + WATCHDOG_GRACE_S)
            if thread.is_alive():
                log.warning("camera.stop_timeout", camera=self.name)

    def _launch(self) -> None:
        if self._thread is not None and self._thread.is_alive() and not self._stop.is_set():
            return
        self.join()  # an on-demand run may still be closing the source, and a device opens once
        with self._cond:
            self._run_id += 1
            self._stop = threading.Event()
            self._state = "starting"
        self._thread = threading.Thread(target=self._run, args=(self._run_id, self._stop),
                                        name=f"camera-{self.name}", daemon=True)
        self._thread.start()
        log.info("camera.start", camera=self.name, kind=self.kind, mode=self.settings.mode,
                 source=redact(self.settings.source))

    @contextmanager
    def _in_use(self, temporary: bool) -> Iterator[float]:
        """Yields the time a request may wait for its first frame on top of fresh_wait_ms.
        `temporary`: run the capture thread just for this request (on demand, or a snapshot)."""
        if not temporary:
            yield 0.0
            return
        with self._users_lock:
            self._users += 1
            self._launch()
        try:
            yield self.settings.open_timeout_s + DRAIN_MAX_S
        finally:
            with self._users_lock:
                self._users -= 1
                if self._users == 0:
                    self.signal_stop()  # the thread closes the source after its current grab

    # --- motion ------------------------------------------------------------------------------
    @property
    def motion_state(self) -> str | None:
        """"ON" or "OFF" (also while not streaming); None when this camera does not detect motion."""
        return None if self._motion is None else self._motion.state

    def set_motion_listener(self, listener: MotionListener | None) -> None:
        """`listener(camera, "ON"|"OFF")` on each change, `listener(camera, state, zone=name)` on a
        zone's, from the capture thread; it must be quick."""
        if self._motion is not None:
            self._motion.set_listener(listener)

    # --- requests ----------------------------------------------------------------------------
    def fresh_frame(self) -> Frame:
        """A frame no older than max_frame_age_ms; waits at most fresh_wait_ms for one (on
        demand: plus the open). CameraUnavailable when the camera is not streaming."""
        with self._in_use(self.settings.mode == "on_demand") as opening_s:
            return self._wait_frame(None, opening_s)

    def frames(self, count: int, interval_ms: int) -> list[Frame]:
        """`count` distinct fresh frames, each captured at least `interval_ms` after the one before."""
        if count < 1:
            raise BadRequest("frames must be 1 or more")
        interval = max(interval_ms / 1000.0, 1e-6)
        with self._in_use(self.settings.mode == "on_demand") as opening_s:
            out = [self._wait_frame(None, opening_s)]
            while len(out) < count:
                out.append(self._wait_frame(out[-1].captured_mono + interval))
        return out

    def snapshot(self) -> Frame:
        """The current frame, for the CLI; opens the camera just for it when no thread runs."""
        idle = not self._thread or self._stop.is_set()
        with self._in_use(self.settings.mode == "on_demand" or idle) as opening_s:
            return self._wait_frame(None, opening_s)

    def info(self) -> dict[str, Any]:
        with self._cond:
            now = time.monotonic()
            state = "failed" if self._hung(now) else self._state
            recent = [t for t in self._grabs if t >= now - FPS_WINDOW_S]
            span = recent[-1] - recent[0] if len(recent) > 1 else 0.0
            age = None if self._last_grab is None else round((now - self._last_grab) * 1000)
            return {"state": state, "mode": self.settings.mode, "kind": self.kind,
                    "fps": round((len(recent) - 1) / span, 1) if span > 0 else 0.0,
                    "last_frame_age_ms": age, "frames": self._seq, "frames_dropped": self._dropped,
                    "reconnects": self._reconnects, "error": self._why(now) if state != "streaming" else None,
                    "motion": self.motion_state,
                    "zones": {} if self._motion is None else self._motion.zone_states()}

    def _hung(self, now: float) -> bool:
        limit = self.settings.read_timeout_s + WATCHDOG_GRACE_S
        return self._state == "streaming" and self._last_grab is not None and now - self._last_grab > limit

    def _why(self, now: float) -> str | None:
        if self._hung(now):
            return f"no frame for {now - (self._last_grab or now):.1f} s: a read hangs"
        return self._error or None

    def _wait_frame(self, not_before: float | None, opening_s: float = 0.0) -> Frame:
        """The latest frame once it is fresh enough and captured at or after `not_before`."""
        s = self.settings
        now = time.monotonic()  # even with fresh_wait_ms=0, a request may wait for the next grab
        deadline = max(now, not_before or now) + opening_s + max(s.fresh_wait_ms / 1000.0, 2 * self._interval)
        with self._cond:
            while True:
                state = "failed" if self._hung(now) else self._state
                if state in ("idle", "reconnecting", "failed"):
                    why = "not running" if state == "idle" else f"{state}: {self._why(now)}"
                    raise CameraUnavailable(f"camera {self.name!r} is {why}")
                threshold = max(now - s.max_frame_age_ms / 1000.0, not_before or 0.0)
                frame = self._frame  # only the latest grab will do: nothing newer was left unused
                if frame is not None and frame.seq == self._seq and frame.captured_mono >= threshold:
                    return frame
                if now >= deadline:
                    if state == "starting":
                        raise CameraUnavailable(f"camera {self.name!r} is still starting")
                    raise StaleFrame(f"camera {self.name!r}: no frame newer than {s.max_frame_age_ms} ms "
                                     f"within {s.fresh_wait_ms} ms")
                self._wants.append(threshold)
                try:
                    self._cond.wait(min(deadline - now, WAIT_SLICE_S))
                finally:
                    self._wants.remove(threshold)
                now = time.monotonic()

    # --- the capture thread ------------------------------------------------------------------
    def _run(self, run_id: int, stop: threading.Event) -> None:
        s, attempt = self.settings, 0
        while not stop.is_set():
            grabbed, error = 0, ""
            try:
                cap = _open(s, self.kind)
                try:
                    grabbed = self._stream(cap, run_id, stop)
                finally:
                    cap.release()
            except _CaptureFailed as exc:
                error = str(exc)
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any surprise
                log.exception("camera.thread_error", camera=self.name)
                error = f"unexpected error: {exc!r}"
            if stop.is_set():
                break
            attempt = 0 if grabbed else attempt
            if not error and grabbed:  # a file ended: play it again
                continue
            error = error or "the source ended without a frame"
            delay = backoff_delay(attempt, s.reconnect_min_s, s.reconnect_max_s)
            attempt += 1
            with self._cond:
                current = run_id == self._run_id
                if current:
                    self._reconnects += 1
                    self._state, self._error = "failed" if attempt >= FAILED_AFTER else "reconnecting", error
                    self._cond.notify_all()
            if current and self._motion is not None:
                self._motion.clear("camera failed")
            log.warning("camera.reconnecting", camera=self.name, error=error, attempt=attempt,
                        retry_in_s=round(delay, 2))
            stop.wait(delay)

    def _stream(self, cap: cv2.VideoCapture, run_id: int, stop: threading.Event) -> int:
        """Grab until the source fails (raises) or, for a file, ends; returns the frames grabbed."""
        s, live = self.settings, self.kind != "file"
        fps = s.fps or cap.get(cv2.CAP_PROP_FPS)
        interval = self._interval = 1.0 / (fps if math.isfinite(fps) and 0.5 <= fps <= 240 else DEFAULT_FPS)
        skip = ON_DEMAND_SKIP if self._users else 0  # opened for a request: let auto-exposure settle
        due = opened = time.monotonic()
        draining, grabbed = live, 0
        while not stop.is_set():
            if not live:  # pace a file at its own rate so that it behaves like a camera
                stop.wait(max(0.0, due - time.monotonic()))
                due = max(due + interval, time.monotonic() - interval)
            started = time.monotonic()
            try:
                ok = bool(cap.grab())
            except cv2.error:
                ok = False
            now = time.monotonic()
            if live and now - started >= s.read_timeout_s:  # what comes after a timeout is stale
                raise _CaptureFailed(f"no frame for {s.read_timeout_s:g} s")
            if not ok:
                if live:
                    raise _CaptureFailed("the stream ended or a read failed")
                return grabbed
            grabbed += 1
            draining &= now - started < DRAIN_BLOCK_FRACTION * interval and now - opened < DRAIN_MAX_S
            if draining:
                with self._cond:
                    self._dropped += 1  # buffered while the source was being opened
            elif grabbed > skip:
                self._publish(cap, run_id, now)
        return grabbed

    def _publish(self, cap: cv2.VideoCapture, run_id: int, grabbed_at: float) -> None:
        wall = time.time() - (time.monotonic() - grabbed_at)
        with self._cond:
            if run_id != self._run_id:
                return
            self._seq += 1
            seq, self._last_grab = self._seq, grabbed_at
            self._grabs.append(grabbed_at)
            if self._state != "streaming":
                self._state, self._error = "streaming", ""
                log.info("camera.streaming", camera=self.name)
            wanted = any(grabbed_at >= t for t in self._wants)
        look = self._motion is not None and self._motion.due(grabbed_at)
        if not (wanted or look):
            return  # nobody waits and no look is due: the frame stays in the decoder, unconverted
        image = self._image(cap)
        frame = None if image is None else self._frame_of(image, seq, grabbed_at, wall)
        with self._cond:
            if run_id != self._run_id:
                return
            self._dropped += frame is None  # a grab that would not decode
            if frame is not None:
                self._frame = frame
                self._cond.notify_all()
        if look and image is not None:
            assert self._motion is not None
            self._motion.look(image, grabbed_at, lambda: run_id == self._run_id)

    @staticmethod
    def _image(cap: cv2.VideoCapture) -> np.ndarray | None:
        """The grabbed frame as BGR, as the source delivers it; None if it would not decode."""
        try:
            ok, image = cap.retrieve()
        except cv2.error:
            return None
        return image if ok and image is not None and image.size else None

    def _frame_of(self, image: np.ndarray, seq: int, mono: float, wall: float) -> Frame:
        s = self.settings
        if s.width and s.height and (image.shape[1], image.shape[0]) != (s.width, s.height):
            image = cv2.resize(image, (s.width, s.height), interpolation=cv2.INTER_AREA)
        if s.rotate:
            image = cv2.rotate(image, ROTATIONS[s.rotate])
        return Frame(self.name, image, wall, mono, seq, image.shape[1], image.shape[0])


# --- the configured cameras ------------------------------------------------------------------
