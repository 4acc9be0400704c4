"""Cameras on real video: a live MPEG-TS stream that ffmpeg sends over loopback UDP (killed,
paused and restarted mid-test) and clips written by ffmpeg at test time."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from structlog.testing import capture_logs

from edge_agent.cameras import camera_set as cameras_module, opencv_env
from edge_agent.cameras.camera import Camera, has_gstreamer
from edge_agent.cameras.camera_set import CameraSet, validate_cameras
from edge_agent.errors import BadRequest, CameraUnavailable, ConfigError, StaleFrame
from edge_agent.settings.model import CameraSettings, Settings
from edge_agent.settings.base import redact
from edge_agent.settings.sources import source_kind
from support import until
from video import UdpStream, free_udp_port, make_clip, running_stream

# Small timing settings: a dead stream is noticed in 1 s, reopened within 1 s.
FAST = dict(open_timeout_s=3.0, read_timeout_s=1.0, reconnect_min_s=0.2, reconnect_max_s=1.0,
            fresh_wait_ms=4000)  # the first frame of a UDP stream comes after ≈1.7 s of probing
SETTLE_S = 10.0


def camera_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("camera-")]


@pytest.fixture(scope="module")
def live() -> Iterator[UdpStream]:
    """One live 640x480 15 fps stream for the tests that only read it."""
    yield from running_stream()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("video") / "clip.mp4", seconds=1.0, size="320x240", fps=15)


@pytest.fixture
def cameras() -> Iterator[Callable[..., Camera]]:
    """Makes cameras (started unless start=False); all are stopped at teardown."""
    made: list[Camera] = []

    def make(source: str, start: bool = True, **overrides: Any) -> Camera:
        camera = Camera(f"cam{len(made)}", CameraSettings(source=source, **{**FAST, **overrides}))
        made.append(camera)
        if start:
            camera.start()
        return camera

    yield make
    for camera in made:
        camera.stop()


# --- live stream ---------------------------------------------------------------------------------
def test_live_frames_are_fresh_and_new(live: UdpStream, cameras: Callable[..., Camera]) -> None:
    cam = cameras(live.url, max_frame_age_ms=500)
    first = cam.fresh_frame()
    assert first.age_ms() < 500 and (first.width, first.height) == (640, 480)
    assert abs(first.captured_at - time.time()) < 1.0
    later = until(lambda: (f := cam.fresh_frame()).seq > first.seq and f, "a later frame", SETTLE_S)
    assert later.age_ms() < 500 and later.captured_mono > first.captured_mono
    time.sleep(1.0)  # let the fps window fill
    info = cam.info()
    assert info["state"] == "streaming" and info["error"] is None
    assert 10 <= info["fps"] <= 20 and info["last_frame_age_ms"] < 500
    assert cam.fresh_frame().age_ms() < 100  # the latest grab, not one retrieved a second ago


def test_frames_are_distinct_and_spaced(live: UdpStream, cameras: Callable[..., Camera]) -> None:
    cam = cameras(live.url)
    frames = cam.frames(3, 200)
    assert len({f.seq for f in frames}) == 3 and [f.seq for f in frames] == sorted(f.seq for f in frames)
    gaps = [b.captured_mono - a.captured_mono for a, b in zip(frames, frames[1:])]
    assert all(0.2 <= gap < 0.45 for gap in gaps), gaps


def test_killed_stream_reconnects_and_resumes(stream: UdpStream, cameras: Callable[..., Camera]) -> None:
    cam = cameras(stream.url, fresh_wait_ms=300)
    until(lambda: cam.info()["state"] == "streaming", "streaming", SETTLE_S)
    stream.stop()
    killed = time.monotonic()
    until(lambda: cam.info()["state"] in ("reconnecting", "failed"), timeout=3.0)
    assert time.monotonic() - killed < 3.0
    asked = time.monotonic()
    with pytest.raises(CameraUnavailable, match="reconnecting|failed"):
        cam.fresh_frame()
    assert time.monotonic() - asked < 0.2  # no waiting on a dead camera
    assert cam.info()["error"] and cam.info()["reconnects"] >= 1

    stream.start()  # same port: the reopen loop finds it
    until(lambda: cam.info()["state"] == "streaming", timeout=15.0)
    assert cam.fresh_frame().age_ms() < cam.settings.max_frame_age_ms


def test_paused_stream_gives_stale_frame_then_recovers(stream: UdpStream, cameras: Callable[..., Camera]) -> None:
    cam = cameras(stream.url, max_frame_age_ms=200, fresh_wait_ms=300, read_timeout_s=5.0)
    until(lambda: cam.info()["state"] == "streaming", "streaming", SETTLE_S)
    stream.pause()
    try:
        def stale() -> bool:
            try:
                cam.fresh_frame()
            except StaleFrame:
                return True
            return False

        until(stale, timeout=3.0)
        assert cam.info()["state"] == "streaming"  # a pause shorter than read_timeout_s is no failure
    finally:
        stream.resume()
    assert until(lambda: cam.fresh_frame(), "a fresh frame", SETTLE_S).age_ms() < 200


def test_unreachable_source_is_unavailable_quickly(cameras: Callable[..., Camera]) -> None:
    cam = cameras(f"udp://127.0.0.1:{free_udp_port()}", open_timeout_s=1.0, fresh_wait_ms=500)
    asked = time.monotonic()
    with pytest.raises(CameraUnavailable):
        cam.fresh_frame()
    assert time.monotonic() - asked < 1.0
    until(lambda: cam.info()["state"] == "reconnecting", timeout=3.0)


def test_on_demand_opens_per_request_and_leaves_no_thread(live: UdpStream, cameras: Callable[..., Camera]) -> None:
    cam = cameras(live.url, mode="on_demand", max_frame_age_ms=500)
    assert camera_threads() == [] and cam.info()["state"] == "idle"
    first = cam.fresh_frame()
    assert first.age_ms() < 500 and first.width == 640
    until(lambda: camera_threads() == [], "no camera thread", SETTLE_S)  # the thread ends after its current grab
    assert cam.info()["state"] == "idle"
    frames = cam.frames(2, 100)  # a second open, right away
    assert frames[1].captured_mono - frames[0].captured_mono >= 0.1 and frames[0].seq > first.seq
    until(lambda: camera_threads() == [], timeout=1.0)


def test_snapshot_of_a_camera_that_is_not_running(live: UdpStream, cameras: Callable[..., Camera]) -> None:
    cam = cameras(live.url, start=False)
    with pytest.raises(CameraUnavailable, match="not running"):
        cam.fresh_frame()
    assert cam.snapshot().age_ms() < 100
    until(lambda: camera_threads() == [], timeout=1.0)
    assert cam.snapshot().seq > 1  # and again (the CLI may take several)
    cam.start()  # a started camera serves snapshots from its thread
    assert cam.snapshot().age_ms() < 100 and camera_threads() == [f"camera-{cam.name}"]


# --- files -----------------------------------------------------------------------------------------
def test_file_camera_loops_forever(clip: Path, cameras: Callable[..., Camera]) -> None:
    cam = cameras(str(clip), fps=60, fresh_wait_ms=0)  # 15 frames a loop, 4 loops a second
    until(lambda: cam.info()["frames"] > 45)
    info = cam.info()
    assert info["state"] == "streaming" and info["reconnects"] == 0 and 45 <= info["fps"] <= 75
    assert cam.fresh_frame().age_ms() < 100  # fresh_wait_ms=0 still waits for the next grab


def test_file_camera_is_paced_and_rotated(clip: Path, cameras: Callable[..., Camera]) -> None:
    cam = cameras(str(clip), rotate=90)
    frame = cam.fresh_frame()
    assert (frame.width, frame.height) == (240, 320) and frame.image.shape == (320, 240, 3)
    frames = cam.frames(2, 0)
    assert 0.03 < frames[1].captured_mono - frames[0].captured_mono < 0.15  # 15 fps, not disk speed


def test_a_frame_older_than_max_frame_age_is_never_handed_out(tmp_path: Path,
                                                               cameras: Callable[..., Camera]) -> None:
    """2 fps: a request 300 ms after a frame finds it too old (200 ms) and waits for the next."""
    slow = make_clip(tmp_path / "slow.mp4", seconds=4.0, size="160x120", fps=2)
    cam = cameras(str(slow), max_frame_age_ms=200, fresh_wait_ms=1500)
    first, newer = cam.fresh_frame(), 0
    for _ in range(3):
        time.sleep(max(0.0, first.captured_mono + 0.3 - time.monotonic()))  # the next grab is 200 ms off
        try:
            frame = cam.fresh_frame()
        except StaleFrame:
            continue  # as good an answer as a newer frame; never the old one
        age = frame.age_ms()
        assert frame.seq > first.seq and age <= 200, (frame.seq, first.seq, age)
        first, newer = frame, newer + 1
    assert newer  # fresh_wait_ms spans three frame intervals: a newer frame comes in time


def test_camera_set(live: UdpStream, clip: Path) -> None:
    cams = CameraSet({"front": CameraSettings(source=live.url, **FAST),
                      "replay": CameraSettings(source=str(clip), **FAST)})
    cams.start_all()
    try:
        assert cams.get("front").fresh_frame().width == 640
        assert cams.get("replay").fresh_frame().width == 320
        assert set(cams.info()) == {"front", "replay"}
        assert {i["state"] for i in cams.info().values()} == {"streaming"}
        for name in ("back", "/dev/video0", str(clip), live.url, ""):
            with pytest.raises(BadRequest, match="unknown camera"):
                cams.get(name)
    finally:
        cams.stop_all()
    assert camera_threads() == []
    assert {i["state"] for i in cams.info().values()} == {"idle"}


# --- configuration -------------------------------------------------------------------------------
@pytest.mark.skipif(has_gstreamer(), reason="this OpenCV has GStreamer")
def test_gstreamer_pipeline_without_gstreamer_is_a_config_error() -> None:
    pipeline = "nvarguscamerasrc ! video/x-raw(memory:NVMM) ! nvvidconv ! appsink"
    with pytest.raises(ConfigError, match="GStreamer") as err:
        Camera("csi", CameraSettings(source=pipeline))
    assert err.value.problems[0].startswith("cameras.csi.source: this OpenCV has no GStreamer support")


def test_validate_cameras_lists_every_problem(tmp_path: Path, clip: Path) -> None:
    settings = Settings(cameras={
        "ok_file": CameraSettings(source=str(clip)), "ok_url": CameraSettings(source="rtsp://10.0.0.5/s"),
        "ok_usb": CameraSettings(source=0), "ok_dev": CameraSettings(source="/dev/video7"),
        "missing": CameraSettings(source=str(tmp_path / "nope.mp4")),
        "scheme": CameraSettings(source="ftp://user:secret@host/x.mp4"),
        "backoff": CameraSettings(source=str(clip), reconnect_min_s=5, reconnect_max_s=1)})
    with pytest.raises(ConfigError) as err:
        validate_cameras(settings)
    problems = err.value.problems
    assert [p.split(":")[0] for p in problems] == [
        "cameras.missing.source", "cameras.scheme.source", "cameras.backoff.reconnect_max_s"]
    assert "secret" not in "\n".join(problems)
    validate_cameras({"ok": CameraSettings(source=str(clip))})


@pytest.mark.parametrize("source,kind", [
    (0, "v4l2"), ("2", "v4l2"), ("/dev/video0", "v4l2"), ("/srv/replay.mp4", "file"),
    ("rtsp://cam/1", "network"), ("HTTP://cam/mjpg", "network"), ("udp://0.0.0.0:5000", "network"),
    ("tcp://cam:8000", "network"), ("v4l2src ! videoconvert ! appsink", "gstreamer"), ("gopher://x", "unknown")])
def test_source_kind(source: str | int, kind: str) -> None:
    assert source_kind(source) == kind


def test_redact_hides_credentials() -> None:
    assert redact("rtsp://admin:hunter2@10.0.0.5:554/s") == "rtsp://***@10.0.0.5:554/s"
    assert redact("/dev/video0") == "/dev/video0"


def test_one_v4l2_read_timeout_for_the_process_the_largest(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenCV's V4L2 backend has no per-capture read timeout and reads its variable once: the
    camera set asks for the largest before any camera opens, not the first camera's."""
    monkeypatch.setenv(opencv_env.V4L_SELECT_TIMEOUT, "99")  # the settings own it
    timeout = opencv_env._V4lTimeout()
    monkeypatch.setattr(cameras_module, "v4l_timeout", timeout)
    on_demand = dict(mode="on_demand")  # nothing opens here
    cams = CameraSet({"a": CameraSettings(source="/dev/video7", read_timeout_s=2, **on_demand),
                      "b": CameraSettings(source=3, read_timeout_s=6.5, **on_demand),
                      "net": CameraSettings(source="rtsp://10.0.0.5/s", read_timeout_s=60, **on_demand)})
    assert os.environ[opencv_env.V4L_SELECT_TIMEOUT] == "7" and timeout.seconds == 7
    assert timeout.want(2, fix=True) == 7  # camera "a" opens first: it waits 7 s too, and it is fixed
    with capture_logs() as logs:
        cams.reconfigure({**{n: cams.get(n).settings for n in cams.names},
                          "c": CameraSettings(source="/dev/video9", read_timeout_s=20, **on_demand)})
    assert os.environ[opencv_env.V4L_SELECT_TIMEOUT] == "7"
    assert [(e["event"], e["wanted_s"]) for e in logs if e["log_level"] == "warning"] == [
        ("camera.v4l2_timeout_fixed", 20)]
