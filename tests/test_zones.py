"""Masks, zones, crops and snapshots: the geometry and settings checks (pure), the detector on
synthetic frames, real cameras on a clip whose only motion is a box in the top-left quarter, and
the agent as a process (real mosquitto, the tiny vision model on real ORT GenAI) running a rule on
a zone with crop = true and publishing the picture the model saw."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from edge_agent.automation.watch import take_snapshot
from edge_agent.cameras.camera import Camera
from edge_agent.cameras.images import crop_frame, fit_jpeg
from edge_agent.cameras.motion import MotionDetector
from edge_agent.settings.model import CameraSettings, Settings
from edge_agent.settings.watch import MotionSettings, WatchRuleSettings
from edge_agent.settings.zones import crop_box
from support import REPO, AgentProcess, Broker, Client, collect, first, next_stats, retained_status
from test_camera import cameras, until  # noqa: F401 - fixtures used by name
from test_motion import looks, scene, with_block
from video import make_corner_clip

CORNER = [[0, 0], [0.5, 0], [0.5, 0.5], [0, 0.5]]  # where the clip's box moves
FAR = [[0.6, 0.6], [1, 0.6], [1, 1], [0.6, 1]]  # where nothing moves


# --- geometry and settings ---------------------------------------------------------------------
@pytest.mark.parametrize("polygon,words", [
    ([[0, 0], [1, 1]], "a polygon needs at least 3 points"),
    ([[0, 0], [1.5, 0], [0, 1]], "point 1 [1.5, 0] is outside 0-1"),
    ([[0, 0], [1, 1], [1, 0], [0, 1]], "the polygon crosses itself (edges 0 and 2)"),
    ([[0, 0], [0.5, 0.5], [1, 1]], "the polygon has no area"),
    ([[0, 0], ["a", 1], [1, 1]], "point 1 must be [x, y] numbers"),
])
def test_bad_polygons_are_settings_errors_naming_the_key(polygon: Any, words: str) -> None:
    with pytest.raises(ValidationError) as zone:
        CameraSettings(source="x.avi", zones={"door": {"polygon": polygon}})
    assert "zones.door.polygon" in str(zone.value) and words in str(zone.value)
    with pytest.raises(ValidationError) as mask:
        MotionSettings(mask=[CORNER, polygon])
    assert "mask" in str(mask.value) and f"mask polygon 1: {words}" in str(mask.value)


def test_rule_zone_checks() -> None:
    with pytest.raises(ValidationError, match="crop needs zone"):
        WatchRuleSettings(camera="yard", prompt="x", every_s=1, crop=True)
    motion = {"enabled": True}
    cams = {"yard": {"source": "x.avi", "motion": motion, "zones": {"door": {"polygon": CORNER}}}}
    with pytest.raises(ValidationError) as unknown:
        Settings(cameras=cams, watch={"r": {"camera": "yard", "prompt": "x", "on_motion": True, "zone": "gate"}})
    assert "watch.r.zone: camera 'yard' has no zone 'gate' (door)" in str(unknown.value)
    with pytest.raises(ValidationError) as no_motion:
        Settings(cameras={"yard": {**cams["yard"], "motion": {"enabled": False}}})
    assert "cameras.yard.zones: zones track motion" in str(no_motion.value)


def test_crop_box_is_the_zone_box_plus_a_margin_clipped() -> None:
    assert crop_box(((0.2, 0.2), (0.6, 0.2), (0.4, 0.7))) == (0.16, 0.15, 0.64, 0.75)
    assert crop_box(tuple(map(tuple, CORNER))) == (0.0, 0.0, 0.55, 0.55)  # clipped at the edge
    image = np.zeros((480, 640, 3), np.uint8)
    part, box = crop_frame(image, (0.0, 0.0, 0.55, 0.55))
    assert part.shape[:2] == (264, 352) and box == (0, 0, 352, 264)


def test_take_snapshot_pops_every_jpeg_and_keeps_the_first() -> None:
    first_jpeg, second = b"\xff\xd8first", b"\xff\xd8second"
    answer = {"id": "watch-r-1", "frames": [
        {"camera": "yard", "captured_at": "t1", "jpeg_base64": base64.b64encode(first_jpeg).decode()},
        {"camera": "yard", "captured_at": "t2", "jpeg_base64": base64.b64encode(second).decode()}]}
    jpeg, info = take_snapshot(answer)
    assert jpeg == first_jpeg and info == {"id": "watch-r-1", "at": "t1"}
    assert all("jpeg_base64" not in frame for frame in answer["frames"])
    assert take_snapshot({"id": "x", "ok": False}) == (None, None)


def test_fit_jpeg_reencodes_smaller_until_it_fits() -> None:
    image = scene(480, 640)
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 98])[1].tobytes()
    assert fit_jpeg(jpeg, len(jpeg)) is jpeg  # fits: untouched
    small = fit_jpeg(jpeg, 8_000)
    assert len(small) <= 8_000 < len(jpeg)
    decoded = cv2.imdecode(np.frombuffer(small, np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None and decoded.shape[1] / decoded.shape[0] == pytest.approx(640 / 480, rel=0.02)


# --- the detector on synthetic frames ----------------------------------------------------------
def test_a_mask_hides_motion_under_it_and_only_there() -> None:
    masked = MotionDetector(MotionSettings(enabled=True, mask=[CORNER]))
    plain = MotionDetector(MotionSettings(enabled=True))
    still = scene()
    looks(masked, [still] * 3), looks(plain, [still] * 3)
    in_corner = [with_block(still, 20 + 30 * i, 40) for i in range(5)]
    assert looks(plain, in_corner) == [True] * 5
    assert looks(masked, in_corner) == [False] * 5
    assert looks(masked, [with_block(still, 450, 300 + 10 * i) for i in range(3)]) == [True] * 3


def test_zones_see_what_reaches_into_them() -> None:
    zones = {"corner": {"polygon": CORNER}, "far": {"polygon": FAR}}
    detector = MotionDetector(MotionSettings(enabled=True), CameraSettings(source="x", zones=zones).zones)
    still = scene()
    looks(detector, [still] * 3)
    assert detector.detect(with_block(still, 40, 40)) and detector.moving_zones == {"corner"}
    assert detector.detect(with_block(still, 500, 380)) and detector.moving_zones == {"far"}
    assert not detector.detect(still) and detector.moving_zones == frozenset()


# --- real cameras on a clip with motion in the top-left quarter only ----------------------------
MOTION = {"enabled": True, "fps": 5, "off_delay_s": 1.0}


@pytest.fixture(scope="module")
def corner_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corner_clip(tmp_path_factory.mktemp("zones") / "corner.avi", seconds=4)


def told(camera: Camera) -> list[tuple[str, str | None]]:
    heard: list[tuple[str, str | None]] = []
    camera.set_motion_listener(lambda name, state, zone=None: heard.append((state, zone)))
    return heard


def test_a_mask_over_the_moving_region_gives_no_motion(corner_clip: Path, cameras: Callable[..., Camera]) -> None:
    masked = cameras(str(corner_clip), start=False, motion={**MOTION, "mask": [CORNER]})
    plain = cameras(str(corner_clip), start=False, motion=MOTION)
    heard_masked, heard_plain = told(masked), told(plain)
    masked.start(), plain.start()
    until(lambda: ("ON", None) in heard_plain, timeout=15)  # the same clip does move
    time.sleep(4.5)  # past a loop of the clip
    assert heard_masked == [("OFF", None)] and masked.motion_state == "OFF"


def test_a_zone_over_the_moving_region_turns_on_another_stays_off(
        corner_clip: Path, cameras: Callable[..., Camera]) -> None:
    cam = cameras(str(corner_clip), start=False, motion=MOTION,
                  zones={"corner": {"polygon": CORNER}, "far": {"polygon": FAR}})
    heard = told(cam)
    cam.start()
    until(lambda: ("ON", "corner") in heard, timeout=15)
    time.sleep(4.5)
    assert heard[:3] == [("OFF", None), ("OFF", "corner"), ("OFF", "far")]  # what it starts from
    assert ("ON", None) in heard and heard.index(("ON", None)) < heard.index(("ON", "corner"))
    assert ("ON", "far") not in heard
    assert cam.info()["zones"] == {"corner": "ON", "far": "OFF"}
    cam.stop()
    assert heard[-2:] == [("OFF", None), ("OFF", "corner")] and cam.info()["zones"]["corner"] == "OFF"


# --- the agent: a rule on a zone, cropped, with its snapshot ------------------------------------
def zone_camera(clip: Path) -> dict[str, Any]:
    return {"source": str(clip), "motion": MOTION,
            "zones": {"corner": {"polygon": CORNER}, "far": {"polygon": FAR}}}


def test_a_rule_on_a_zone_sees_the_crop_and_publishes_what_it_saw(
        start_agent: Callable[..., AgentProcess], broker: Broker, client: Client, vision_model: Path,
        corner_clip: Path) -> None:
    agent = start_agent(broker, client, model=vision_model, images__longest_side=1008, stats_interval_s=1,
                        cameras={"yard": zone_camera(corner_clip)},
                        watch={"corner": {"camera": "yard", "prompt": "Who is there?", "on_motion": True,
                                          "zone": "corner", "crop": True, "max_tokens": 4, "cooldown_s": 60},
                               "far": {"camera": "yard", "prompt": "Who is there?", "on_motion": True,
                                       "zone": "far", "max_tokens": 4}})
    base = f"{agent.prefix}/{agent.device_id}"
    client.subscribe(f"{base}/#")
    messages = collect(client, 10)
    by_topic: dict[str, list[bytes]] = {}
    for _, topic, payload in messages:
        by_topic.setdefault(topic, []).append(payload)
    assert b"ON" in by_topic[f"{base}/camera/yard/zone/corner/motion"]
    assert set(by_topic[f"{base}/camera/yard/zone/far/motion"]) == {b"OFF"}
    assert f"{base}/watch/far" not in by_topic  # its zone never moved: the rule never ran
    state = json.loads(by_topic[f"{base}/watch/corner"][0])
    assert state["trigger"] == "motion"
    frame = state["frames"][0]
    # The clip is 320x240; the zone's box plus the margin is 0-0.55 of each side.
    assert (frame["width"], frame["height"]) == (176, 132)
    assert frame["crop"] == {"x": 0, "y": 0, "width": 176, "height": 132, "frame_width": 320, "frame_height": 240}
    assert "jpeg_base64" not in frame
    snapshot_topic = f"{base}/watch/corner/snapshot"
    assert state["snapshot"]["topic"] == snapshot_topic and state["snapshot"]["at"] == frame["captured_at"]
    assert state["snapshot"]["id"].startswith("watch-corner-")
    event = next(json.loads(p) for p in by_topic[f"{base}/events"] if json.loads(p)["rule"] == "corner")
    assert event["snapshot"] == state["snapshot"]
    jpeg = by_topic[snapshot_topic][-1]
    assert jpeg[:3] == b"\xff\xd8\xff" and len(jpeg) == state["snapshot"]["bytes"]
    picture = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape[:2] == (132, 176)  # the frame the model saw
    # Retained for whoever comes later; in the status and stats too.
    late = Client(broker.port)
    try:
        late.subscribe(snapshot_topic)
        assert first(late, snapshot_topic)[1] == jpeg
    finally:
        late.close()
    zones = retained_status(broker.port, agent)["cameras"]["yard"]["zones"]
    assert set(zones) == {"corner", "far"} and zones["far"] == "OFF"
    assert next_stats(broker.port, agent)["cameras"]["yard"]["zones"]["far"] == "OFF"


def test_a_small_snapshot_limit_is_kept_and_no_snapshot_means_none(
        start_agent: Callable[..., AgentProcess], broker: Broker, client: Client, vision_model: Path,
        corner_clip: Path) -> None:
    agent = start_agent(broker, client, model=vision_model, cameras={"yard": zone_camera(corner_clip)},
                        reload_debounce_s=0.2,
                        watch={"small": {"camera": "yard", "prompt": "Anything?", "every_s": 1, "max_tokens": 4,
                                         "publish": "always", "snapshot_max_bytes": 3000},
                               "none": {"camera": "yard", "prompt": "Anything?", "every_s": 1, "max_tokens": 4,
                                        "snapshot": False}})
    base = f"{agent.prefix}/{agent.device_id}"
    client.subscribe(f"{base}/watch/#")
    messages = collect(client, 4)
    small = [p for _, t, p in messages if t == f"{base}/watch/small/snapshot"]
    assert small and all(len(p) <= 3000 and p[:2] == b"\xff\xd8" for p in small)
    assert cv2.imdecode(np.frombuffer(small[-1], np.uint8), cv2.IMREAD_COLOR) is not None
    none = json.loads(next(p for _, t, p in messages if t == f"{base}/watch/none"))
    assert none["snapshot"] is None and "jpeg_base64" not in none["frames"][0]
    assert not [t for _, t, _ in messages if t == f"{base}/watch/none/snapshot"]
    # A zone and a rule removed from the file lose their retained topics.
    data = json.loads(json.dumps(agent.data))
    data["cameras"]["yard"]["zones"] = {"corner": {"polygon": CORNER}}
    data["watch"] = {"none": data["watch"]["none"]}
    agent.data = data
    agent.rewrite()
    client.subscribe(f"{base}/camera/#")
    cleared = collect(client, 5)
    for topic in (f"{base}/watch/small", f"{base}/watch/small/snapshot", f"{base}/camera/yard/zone/far/motion"):
        assert [p for _, t, p in cleared if t == topic][-1:] == [b""], topic


def test_an_unknown_zone_stops_the_start_with_exit_78(tmp_path: Path, broker: Broker, vision_model: Path,
                                                      corner_clip: Path) -> None:
    agent = AgentProcess(tmp_path, broker.port, vision_model, cameras={"yard": zone_camera(corner_clip)},
                         watch={"r": {"camera": "yard", "prompt": "x", "on_motion": True, "zone": "gate"}})
    result = subprocess.run([sys.executable, "-m", "edge_agent", "run", "--config", str(agent.config)],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 78, result.stderr
    assert "watch.r.zone: camera 'yard' has no zone 'gate' (corner, far)" in result.stderr


def test_crop_is_refused_from_outside_callers(start_agent: Callable[..., AgentProcess], broker: Broker,
                                             client: Client, vision_model: Path, corner_clip: Path) -> None:
    # With a template configured too: the limits once took the templates for the trusted flag.
    agent = start_agent(broker, client, model=vision_model, cameras={"yard": zone_camera(corner_clip)},
                        prompts={"templates": {"look": {"text": "What is in the {place}?"}}})
    client.subscribe(agent.response_topic)
    client.publish(agent.request_topic, json.dumps({"id": "c1", "prompt": "x", "camera": "yard",
                                                    "crop": [0, 0, 0.5, 0.5]}))
    answer = client.wait_for(lambda d: d.get("id") == "c1", timeout=30)
    assert answer["ok"] is False and answer["error"]["code"] == "bad_request"
    assert "unknown field(s): 'crop'" in answer["error"]["message"]
