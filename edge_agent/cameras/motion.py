"""Motion on a camera, Frigate-style: a detector that compares a small grayscale copy of a frame
with a running average of the scene, a pure ON/OFF tracker, and the per-camera watch that paces
detection and tells a listener of every change.

The detector looks at a frame `frame_height` pixels high: contrast stretched (percentile bounds
averaged over recent frames, so a single frame cannot swing them), blurred, subtracted from the
running average; the pixels that differ by more than `threshold` are dilated into regions, and a
region whose area is over `contour_area` is motion. Changed pixels under the camera's mask never
count; a zone has motion when a moving region reaches into it (masks and zones are rasterised
once per frame size). When most of the picture changes at once (a
lamp, the IR switch at dusk) it is light, not motion: the detector recalibrates, blending frames
in fast and reporting nothing until the scene is steady again. camera.py feeds it frames; this
module imports cv2 only for image arithmetic.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Literal, Mapping

import edge_agent.cameras.opencv_env  # noqa: F401 - OpenCV's process-wide settings before cv2 loads
import cv2
import numpy as np

from edge_agent.log import get_logger
from edge_agent.settings.watch import MotionSettings
from edge_agent.settings.zones import Polygon, ZoneSettings

log = get_logger("motion")

State = Literal["ON", "OFF"]
# listener(camera, state) for the camera; listener(camera, state, zone=name) for one of its zones
MotionListener = Callable[..., None]

CALIBRATING_ALPHA = 0.2  # blend fast while the background is unknown
LIGHTING_SHARE = 0.8  # changed regions covering more of the picture than this: light, recalibrate
CALIBRATED_SHARE = 0.05  # calibration ends once less than this changed...
CALIBRATED_REGIONS = 4  # ...in at most this many moving regions
PERSIST_LOOKS = 10  # a change seen this many looks in a row starts blending in (a parked car)
CONTRAST_HISTORY = 50  # frames whose percentile bounds are averaged for the stretch
LOW_PCT, HIGH_PCT = 0.04, 0.96  # bounds of the stretch: ignores a few very dark or bright pixels
BLUR = (3, 3)


class MotionDetector:
    """`detect(image_bgr)` is True when the frame shows motion against the scene seen so far.
    The first frame (or one of another size) becomes the background and shows none."""

    def __init__(self, settings: MotionSettings, zones: Mapping[str, ZoneSettings] | None = None) -> None:
        self.settings = settings
        self.zones = {name: zone.polygon for name, zone in (zones or {}).items()}
        self.moving_zones: frozenset[str] = frozenset()  # the zones the last detect() saw motion in
        self.calibrating = True
        self._allowed: np.ndarray | None = None  # 255 outside the mask, at the size looked at
        self._zone_rasters: dict[str, np.ndarray] = {}
        self._size: tuple[int, int] | None = None  # (width, height) looked at
        self._shape: tuple[int, ...] = ()  # of the frames that size was made for
        self._average: np.ndarray | None = None  # float32 background
        self._stretch = ContrastStretch()
        self._streak = 0  # looks in a row with motion

    def detect(self, image_bgr: np.ndarray) -> bool:
        gray = self._prepared(image_bgr)
        self.moving_zones = frozenset()
        if self._average is None or self._average.shape != gray.shape:
            self._average, self._streak, self.calibrating = gray.astype(np.float32), 0, False
            return False
        regions, changed, moving = self._regions(gray)
        if changed > LIGHTING_SHARE:
            self.calibrating = True
        elif self.calibrating and changed < CALIBRATED_SHARE and regions <= CALIBRATED_REGIONS:
            self.calibrating = False
        self._streak = self._streak + 1 if regions else 0
        if self.calibrating or not regions or self._streak >= PERSIST_LOOKS:
            # A moving object is kept out of the background, or it would leave a ghost behind.
            alpha = CALIBRATING_ALPHA if self.calibrating else self.settings.frame_alpha
            cv2.accumulateWeighted(gray, self._average, alpha)
        seen = bool(regions) and not self.calibrating
        if seen and self._zone_rasters:
            self.moving_zones = self._zones_reached(moving)
        return seen

    def _prepared(self, image_bgr: np.ndarray) -> np.ndarray:
        """Small, gray, stretched and blurred. The BGR frame is shrunk first: converting the small
        copy to gray is ~20x cheaper than converting the whole frame (bench/MOTION.md)."""
        if image_bgr.shape != self._shape:
            high, wide = image_bgr.shape[:2]
            height = min(self.settings.frame_height, high)
            self._size, self._shape = (max(1, round(wide * height / high)), height), image_bgr.shape
            self._rasterise(self._size)
        assert self._size is not None
        small = cv2.resize(image_bgr, self._size, interpolation=cv2.INTER_NEAREST)
        gray = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY) if small.ndim == 3 else small
        return cv2.GaussianBlur(self._stretch(gray, restart=self.calibrating), BLUR, 1.0)

    def _rasterise(self, size: tuple[int, int]) -> None:
        """Mask and zones at the size looked at, once per size: per look they cost one AND each."""
        self._allowed = None
        if self.settings.mask:
            self._allowed = cv2.bitwise_not(_raster(self.settings.mask, size))
        self._zone_rasters = {name: _raster((polygon,), size) for name, polygon in self.zones.items()}

    def _regions(self, gray: np.ndarray) -> tuple[int, float, list[Any]]:
        """(regions over contour_area, share of the picture inside changed regions, those regions)."""
        assert self._average is not None
        delta = cv2.absdiff(gray, cv2.convertScaleAbs(self._average))
        _, mask = cv2.threshold(delta, self.settings.threshold, 255, cv2.THRESH_BINARY)
        if self._allowed is not None:
            mask = cv2.bitwise_and(mask, self._allowed)
        contours, _ = cv2.findContours(cv2.dilate(mask, None), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        areas = [cv2.contourArea(c) for c in contours]
        moving = [c for c, a in zip(contours, areas) if a > self.settings.contour_area]
        return len(moving), sum(areas) / gray.size, moving

    def _zones_reached(self, moving: list[Any]) -> frozenset[str]:
        """The zones that a moving region overlaps (drawn filled at the size looked at)."""
        assert self._size is not None
        drawn = np.zeros((self._size[1], self._size[0]), np.uint8)
        cv2.drawContours(drawn, moving, -1, 255, cv2.FILLED)
        return frozenset(name for name, zone in self._zone_rasters.items()
                         if cv2.countNonZero(cv2.bitwise_and(drawn, zone)))


def _raster(polygons: tuple[Polygon, ...], size: tuple[int, int]) -> np.ndarray:
    """255 inside the polygons (relative coordinates), 0 elsewhere, at `size` (width, height)."""
    wide, high = size
    out = np.zeros((high, wide), np.uint8)
    points = [np.array([[round(x * (wide - 1)), round(y * (high - 1))] for x, y in polygon], np.int32)
              for polygon in polygons]
    cv2.fillPoly(out, points, 255)
    return out


class ContrastStretch:
    """Maps the LOW_PCT..HIGH_PCT percentiles of gray levels, averaged over recent frames, to 0-255.
    Few numpy calls, and the table rebuilt only when the bounds move: on the capture thread, between
    decodes, each call costs many times what it does in a warm loop."""

    def __init__(self) -> None:
        self._bounds: deque[tuple[int, int]] = deque(maxlen=CONTRAST_HISTORY)
        self._low_sum = self._high_sum = 0
        self._key: tuple[int, int] | None = None  # averaged bounds, in half levels
        self._table: np.ndarray | None = None

    def __call__(self, gray: np.ndarray, restart: bool) -> np.ndarray:
        """`restart`: new light; stretch for it at once, or the stretch drifts for 50 frames."""
        cumulative = cv2.calcHist([gray], [0], None, [256], [0, 256]).cumsum()
        low, high = (int(i) for i in cumulative.searchsorted((LOW_PCT * gray.size, HIGH_PCT * gray.size)))
        if low >= high:
            return gray  # one flat colour: nothing to stretch
        if restart:
            self._bounds.clear()
            self._low_sum = self._high_sum = 0
        if len(self._bounds) == self._bounds.maxlen:
            old_low, old_high = self._bounds[0]
            self._low_sum, self._high_sum = self._low_sum - old_low, self._high_sum - old_high
        self._bounds.append((low, high))
        self._low_sum, self._high_sum = self._low_sum + low, self._high_sum + high
        key = (round(2 * self._low_sum / len(self._bounds)), round(2 * self._high_sum / len(self._bounds)))
        if key != self._key:
            self._key, low_avg, high_avg = key, key[0] / 2, key[1] / 2
            self._table = None if high_avg - low_avg < 1 else np.clip(
                (np.arange(256) - low_avg) * (255.0 / (high_avg - low_avg)), 0, 255).astype(np.uint8)
        return gray if self._table is None else cv2.LUT(gray, self._table)


class MotionTracker:
    """ON at a look with motion; OFF once `off_delay_s` passed without any. Pure: times are given."""

    def __init__(self, off_delay_s: float) -> None:
        self.off_delay_s = off_delay_s
        self.state: State = "OFF"
        self._last_motion = 0.0

    def update(self, motion: bool, now: float) -> bool:
        """Takes one look's result; True when the state changed."""
        if motion:
            self._last_motion = now
            if self.state == "OFF":
                self.state = "ON"
                return True
        elif self.state == "ON" and now - self._last_motion >= self.off_delay_s:
            self.state = "OFF"
            return True
        return False

    def clear(self) -> bool:
        """OFF at once (the camera stopped or failed); True when it was ON."""
        was_on, self.state = self.state == "ON", "OFF"
        return was_on


class MotionWatch:
    """One camera's motion and its zones': paces looks at `fps`, tracks the states, tells the listener.

    Looks run on the capture thread; `clear` runs on whichever thread stops the camera. Changes are
    told under one lock and `look` re-checks that its run is current inside it, so an OFF told at a
    stop is never followed by an ON from the stopped run's last frame."""

    def __init__(self, camera: str, settings: MotionSettings, detector: MotionDetector | None = None,
                 zones: Mapping[str, ZoneSettings] | None = None) -> None:
        self.camera, self.settings = camera, settings
        self.detector = detector or MotionDetector(settings, zones)
        self.tracker = MotionTracker(settings.off_delay_s)
        self.zones = {name: MotionTracker(settings.off_delay_s) for name in (zones or {})}
        self._period = 1.0 / settings.fps
        self._due = 0.0
        self._lock = threading.Lock()
        self._listener: MotionListener | None = None
        self._told: dict[str | None, State] = {}  # what the listener last heard, per zone (None: camera)

    @property
    def state(self) -> State:
        return self.tracker.state

    def zone_states(self) -> dict[str, State]:
        return {name: tracker.state for name, tracker in self.zones.items()}

    def set_listener(self, listener: MotionListener | None) -> None:
        """A new listener hears the current states at the next look (then every change)."""
        with self._lock:
            self._listener, self._told = listener, {}

    def due(self, now: float) -> bool:
        """Whether the frame grabbed at `now` should be looked at; at most `fps` a second."""
        if now < self._due:
            return False
        # Keep to the schedule through frame jitter; after a gap, start a new one from now.
        self._due = self._due + self._period if now < self._due + self._period else now + self._period
        return True

    def look(self, image_bgr: np.ndarray, now: float, current: Callable[[], bool]) -> None:
        """Detect on one frame; `current()` says whether the capture run is still the camera's."""
        motion = self.detector.detect(image_bgr)
        moving = self.detector.moving_zones
        with self._lock:
            if not current():
                return
            if self.tracker.update(motion, now):
                log.info("motion.on" if motion else "motion.off", camera=self.camera)
            for name, tracker in self.zones.items():
                if tracker.update(name in moving, now):
                    log.info("motion.zone_on" if name in moving else "motion.zone_off", camera=self.camera, zone=name)
            self._tell()

    def clear(self, why: str) -> None:
        """The camera stopped or failed (`why`): OFF, told for what was ON."""
        with self._lock:
            changed = [tracker.clear() for tracker in (self.tracker, *self.zones.values())]
            if any(changed):
                log.info("motion.off", camera=self.camera, why=why)
                self._tell()

    def _tell(self) -> None:
        """The camera's state first: a zone turning ON never comes before its camera does."""
        if self._listener is None:
            return
        for zone, tracker in ((None, self.tracker), *self.zones.items()):
            state = tracker.state
            if self._told.get(zone) == state:
                continue
            self._told[zone] = state
            try:
                if zone is None:
                    self._listener(self.camera, state)
                else:
                    self._listener(self.camera, state, zone=zone)
            except Exception:  # noqa: BLE001 - a listener's bug must not stop the capture thread
                log.exception("motion.listener_error", camera=self.camera, zone=zone)
