"""Motion detection: the detector on synthetic frames, the tracker and watch with a fake clock, and
real cameras on clips written by ffmpeg (a still scene, then a box crossing it)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pytest

from edge_agent.cameras import motion
from edge_agent.cameras.camera import Camera
from edge_agent.cameras.camera_set import CameraSet
from edge_agent.cameras.motion import MotionDetector, MotionTracker, MotionWatch
from edge_agent.settings.model import CameraSettings
from edge_agent.settings.watch import MotionSettings
from test_camera import FAST, cameras, until  # noqa: F401 - fixtures used by name
from video import UdpStream, make_motion_clip, make_still_clip

ON = MotionSettings(enabled=True)


# --- the detector, on synthetic frames -----------------------------------------------------------
def scene(height: int = 480, width: int = 640, seed: int = 7) -> np.ndarray:
    """A textured BGR picture, smooth enough to look like a real one after scaling down."""
    noise = np.random.default_rng(seed).random((height // 8, width // 8, 3)).astype(np.float32)
    image = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    return cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def with_block(image: np.ndarray, x: int, y: int, side: int = 80, value: int | None = None) -> np.ndarray:
    """A copy with a square at (x, y): black and white halves, or a flat `value`."""
    out = image.copy()
    if value is None:
        out[y:y + side, x:x + side] = 0
        out[y:y + side, x:x + side // 2] = 255
    else:
        out[y:y + side, x:x + side] = value
    return out


def looks(detector: MotionDetector, frames: list[np.ndarray]) -> list[bool]:
    return [detector.detect(frame) for frame in frames]


def test_still_scene_is_quiet() -> None:
    detector, still = MotionDetector(ON), scene()
    assert looks(detector, [still] * 50) == [False] * 50
    assert not detector.calibrating


def test_moving_block_is_motion_until_it_leaves() -> None:
    detector, still = MotionDetector(ON), scene()
    looks(detector, [still] * 5)
    moving = [with_block(still, 40 + 50 * i, 200) for i in range(10)]
    assert looks(detector, moving) == [True] * 10
    # Gone: the background was kept free of the block, so the scene is quiet at once.
    assert looks(detector, [still] * 5) == [False] * 5


def test_motion_in_a_small_picture_and_one_of_another_size() -> None:
    detector, small = MotionDetector(ON), scene(60, 80)  # under frame_height: used as it is
    assert looks(detector, [small, small, with_block(small, 20, 20, side=20)]) == [False, False, True]
    assert detector.detect(scene(720, 1280)) is False  # a new size: a new background, no motion


def test_brightness_jump_recalibrates_instead_of_motion() -> None:
    detector, still = MotionDetector(ON), scene()
    looks(detector, [still] * 10)
    lit = cv2.add(still, np.full_like(still, 70))  # a lamp goes on: every pixel brighter
    seen = looks(detector, [lit] * 40)
    assert seen == [False] * 40 and detector.calibrating is False
    # Not deaf afterwards: a block on the lit scene is motion again.
    assert looks(detector, [with_block(lit, 100 + 50 * i, 200) for i in range(3)]) == [True] * 3


def test_without_recalibration_the_jump_would_be_motion(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test above passes because of the lighting rule, not because the jump is too small."""
    monkeypatch.setattr(motion, "LIGHTING_SHARE", 1.01)
    detector, still = MotionDetector(ON), scene()
    looks(detector, [still] * 10)
    assert looks(detector, [cv2.add(still, np.full_like(still, 70))] * 5) == [True] * 5


@pytest.mark.parametrize("threshold,seen", [(30, True), (100, False)])
def test_threshold_decides_a_faint_change(threshold: int, seen: bool) -> None:
    detector, still = MotionDetector(MotionSettings(enabled=True, threshold=threshold)), scene()
    looks(detector, [still] * 3)
    faint = still.copy()
    region = faint[200:280, 300:380]
    region[...] = cv2.subtract(region, np.full_like(region, 30))  # 30 levels darker: ≈70 once stretched
    assert detector.detect(faint) is seen


@pytest.mark.parametrize("contour_area,seen", [(10, True), (300, False)])
def test_contour_area_decides_a_small_change(contour_area: int, seen: bool) -> None:
    detector, still = MotionDetector(MotionSettings(enabled=True, contour_area=contour_area)), scene()
    looks(detector, [still] * 3)
    assert detector.detect(with_block(still, 300, 200, side=30, value=0)) is seen  # ≈6 px at 100 px high


# --- tracker and watch, with a fake clock ----------------------------------------------------------
def test_tracker_turns_on_at_motion_and_off_after_the_delay() -> None:
    tracker = MotionTracker(off_delay_s=3.0)
    assert tracker.state == "OFF" and tracker.update(False, 0.0) is False
    assert tracker.update(True, 1.0) is True and tracker.state == "ON"
    assert tracker.update(True, 2.0) is False  # still ON: no change
    assert tracker.update(False, 4.9) is False and tracker.state == "ON"  # 2.9 s after the last motion
    assert tracker.update(False, 5.0) is True and tracker.state == "OFF"
    assert tracker.update(False, 9.0) is False
    assert tracker.update(True, 10.0) is True and tracker.clear() is True and tracker.state == "OFF"
    assert tracker.clear() is False


class Scripted(MotionDetector):
    """Answers what the test says; the image is ignored."""

    def __init__(self) -> None:
        super().__init__(ON)
        self.answers: list[bool] = []

    def detect(self, image_bgr: np.ndarray) -> bool:
        return self.answers.pop(0)


def test_watch_paces_looks_at_fps() -> None:
    watch = MotionWatch("cam", MotionSettings(enabled=True, fps=5))
    grabs = [i / 15 + (0.004 if i % 2 else -0.004) for i in range(150)]  # 10 s at 15 fps, jittery
    due = [t for t in grabs if watch.due(t)]
    assert 49 <= len(due) <= 51
    assert min(b - a for a, b in zip(due, due[1:])) > 0.12  # never two frames in a row
    after_gap = [t for t in (20.0, 20.05, 20.1, 20.2, 20.25) if watch.due(t)]
    assert after_gap == [20.0, 20.2]  # a new schedule from the first frame after a gap


def test_watch_tells_each_change_once() -> None:
    detector, told = Scripted(), []
    watch = MotionWatch("yard", MotionSettings(enabled=True, off_delay_s=1.0), detector)
    watch.set_listener(lambda camera, state: told.append((camera, state)))
    detector.answers = [False, True, True, False, False, False]
    for t in (0.0, 0.2, 0.4, 0.6, 1.2, 1.6):
        watch.look(np.zeros((4, 4, 3), np.uint8), t, lambda: True)
    assert told == [("yard", "OFF"), ("yard", "ON"), ("yard", "OFF")]  # OFF at 1.6: 1.2 s after 0.4


def test_watch_stop_while_on_tells_off_and_a_stale_look_tells_nothing() -> None:
    detector, told = Scripted(), []
    watch = MotionWatch("yard", ON, detector)
    watch.set_listener(lambda camera, state: told.append(state))
    detector.answers = [True, True]
    watch.look(np.zeros((4, 4, 3), np.uint8), 0.0, lambda: True)
    watch.clear("camera stopped")
    watch.look(np.zeros((4, 4, 3), np.uint8), 0.2, lambda: False)  # the stopped run's last frame
    assert told == ["ON", "OFF"] and watch.state == "OFF"
    watch.clear("camera stopped")  # already OFF: nothing to tell
    other: list[str] = []
    watch.set_listener(lambda camera, state: other.append(state))  # a new listener hears the state
    detector.answers = [False]
    watch.look(np.zeros((4, 4, 3), np.uint8), 0.4, lambda: True)
    assert other == ["OFF"] and told == ["ON", "OFF"]


def test_listener_error_does_not_escape() -> None:
    detector = Scripted()
    watch = MotionWatch("yard", ON, detector)
    watch.set_listener(lambda camera, state: 1 / 0)
    detector.answers = [True]
    watch.look(np.zeros((4, 4, 3), np.uint8), 0.0, lambda: True)
    assert watch.state == "ON"


# --- real cameras on clips ---------------------------------------------------------------------------
STILL_S, MOVING_S, OFF_DELAY_S = 3.0, 3.0, 1.0
MOTION = MotionSettings(enabled=True, fps=5, off_delay_s=OFF_DELAY_S)


@pytest.fixture(scope="module")
def still_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_still_clip(tmp_path_factory.mktemp("motion") / "still.avi", seconds=4)


@pytest.fixture(scope="module")
def motion_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_motion_clip(tmp_path_factory.mktemp("motion") / "moving.avi", still_s=STILL_S, moving_s=MOVING_S)


@pytest.fixture
def detect_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The thread of every real detect() call, in order."""
    seen: list[str] = []
    real = MotionDetector.detect

    def counted(self: MotionDetector, image_bgr: np.ndarray) -> bool:
        seen.append(threading.current_thread().name)
        return real(self, image_bgr)

    monkeypatch.setattr(MotionDetector, "detect", counted)
    return seen


class Heard:
    """A motion listener that notes (monotonic time, camera, state, the camera's info()["motion"])."""

    def __init__(self, camera: Callable[[str], Camera | None] = lambda name: None) -> None:
        self.calls: list[tuple[float, str, str, Any]] = []
        self._camera = camera

    def __call__(self, name: str, state: str) -> None:
        cam = self._camera(name)
        self.calls.append((time.monotonic(), name, state, cam.info()["motion"] if cam else None))

    def states(self) -> list[tuple[str, str]]:
        return [(name, state) for _, name, state, _ in self.calls]


def test_still_clip_never_turns_on(still_clip: Path, cameras: Callable[..., Camera],
                                   detect_threads: list[str]) -> None:
    cam = cameras(str(still_clip), start=False, motion=MOTION)
    heard = Heard(lambda name: cam)
    cam.set_motion_listener(heard)
    cam.start()
    until(lambda: heard.calls)
    looked = len(detect_threads)
    time.sleep(6.5)  # past a loop of the clip (4 s)
    assert heard.states() == [(cam.name, "OFF")] and heard.calls[0][3] == "OFF"
    assert cam.motion_state == "OFF" and cam.info()["motion"] == "OFF"
    assert 20 <= len(detect_threads) - looked <= 36  # 5 looks a second, not the clip's 15 frames


def test_moving_box_turns_on_then_off(motion_clip: Path, cameras: Callable[..., Camera],
                                      detect_threads: list[str]) -> None:
    cam = cameras(str(motion_clip), start=False, motion=MOTION)
    plain = cameras(str(motion_clip), start=False)  # motion disabled, same clip
    by_name = {cam.name: cam, plain.name: plain}
    heard = Heard(by_name.get)
    for camera in (cam, plain):
        camera.set_motion_listener(heard)
        camera.start()
    until(lambda: len(heard.calls) >= 3, timeout=STILL_S + MOVING_S + OFF_DELAY_S + 10)
    (first, _, _, _), (on, _, _, _), (off, _, _, _) = heard.calls[:3]
    assert heard.states()[:3] == [(cam.name, "OFF"), (cam.name, "ON"), (cam.name, "OFF")]
    assert [info for *_, info in heard.calls[:3]] == ["OFF", "ON", "OFF"]  # info() agrees at each call
    # The box enters STILL_S after the clip's first frame (the first OFF) and has left MOVING_S later.
    assert STILL_S - 0.3 < on - first < STILL_S + 2.0, on - first
    assert STILL_S + MOVING_S + OFF_DELAY_S - 0.5 < off - first < STILL_S + MOVING_S + OFF_DELAY_S + 2.5, \
        off - first
    assert cam.motion_state == "OFF" and cam.info()["motion"] == "OFF"
    assert plain.motion_state is None and plain.info()["motion"] is None
    assert plain.info()["frames"] > 90  # it did play the moving part
    assert set(detect_threads) == {f"camera-{cam.name}"}  # the disabled camera never looked


def test_stop_fail_and_reconfigure_tell_off(motion_clip: Path, stream: UdpStream) -> None:
    settings = CameraSettings(source=str(motion_clip), motion=MOTION, **FAST)
    live = CameraSettings(source=stream.url, motion=MOTION, **FAST)
    cams = CameraSet({"yard": settings, "road": live})
    heard = Heard()
    cams.set_motion_listener(heard)
    cams.start_all()
    try:
        # testsrc scrolls: the live camera turns ON; when its stream dies it turns OFF.
        until(lambda: ("road", "ON") in heard.states())
        stream.stop()
        until(lambda: heard.states().count(("road", "OFF")) == 2)
        assert cams.get("road").info()["state"] in ("reconnecting", "failed")
        assert cams.get("road").motion_state == "OFF"

        until(lambda: ("yard", "ON") in heard.states(), timeout=STILL_S + 10)
        old = cams.get("yard")
        cams.reconfigure({"yard": settings.model_copy(update={"fps": 15.0}), "road": live})
        assert old.motion_state == "OFF" and cams.get("yard") is not old
        yard = [state for _, name, state, _ in heard.calls if name == "yard"]
        assert yard[:3] == ["OFF", "ON", "OFF"]  # the replaced camera was ON: it told OFF
        # The new camera has the listener: OFF at its start, ON when its box comes.
        until(lambda: [s for _, n, s, _ in heard.calls if n == "yard"][3:] == ["OFF", "ON"], timeout=STILL_S + 10)
    finally:
        cams.stop_all()
    assert heard.states()[-1] == ("yard", "OFF")  # stopped while ON
    assert {name: info["motion"] for name, info in cams.info().items()} == {"yard": "OFF", "road": "OFF"}

