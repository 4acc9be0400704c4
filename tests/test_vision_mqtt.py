"""Cameras and images over MQTT, the way a pipeline asks: a real file camera and a live ffmpeg
stream, the tiny Phi-3.5-vision-style model on real ORT GenAI, a real mosquitto."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import pytest

from support import AgentProcess, Broker, Client, answers_client, ask, running_agent
from video import UdpStream, make_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clip") / "yard.mp4", seconds=2.0)


@pytest.fixture(scope="module")
def vision_agent(broker: Broker, vision_model: Path, clip: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    yield from running_agent(tmp_path_factory.mktemp("vision"), broker.port, vision_model,
                             limits__max_payload_bytes=4_000_000, images__longest_side=336,
                             cameras={"front": {"source": str(clip)}, "back": {"source": str(clip)}})


@pytest.fixture
def pipeline(broker: Broker, vision_agent: AgentProcess) -> Iterator[Client]:
    yield from answers_client(broker.port, vision_agent)


def still_answers(pipeline: Client, agent: AgentProcess) -> None:
    assert ask(pipeline, agent, {"camera": "front", "prompt": "Still there?", "max_tokens": 2})["ok"]


def encoded(ext: str, size: tuple[int, int] = (120, 160)) -> str:
    image = np.full((*size, 3), 90, np.uint8)
    cv2.rectangle(image, (10, 10), (60, 50), (0, 200, 255), -1)
    ok, data = cv2.imencode(ext, image)
    assert ok
    return base64.b64encode(data.tobytes()).decode()


def png_header(width: int, height: int) -> str:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk).decode()


def test_camera_question_answers_with_a_fresh_frame(pipeline: Client, vision_agent: AgentProcess) -> None:
    doc = ask(pipeline, vision_agent, {"camera": "front", "prompt": "Is the door open?", "max_tokens": 4})
    assert doc["ok"] and doc["usage"]["prompt_tokens"] > 1000  # the image's tokens are in the prompt
    (frame,) = doc["frames"]
    assert set(frame) == {"camera", "captured_at", "age_ms", "seq", "width", "height"}
    assert frame["camera"] == "front" and (frame["width"], frame["height"]) == (320, 240)
    assert 0 <= frame["age_ms"] < 1000 and frame["captured_at"].endswith("Z")


def test_two_cameras_in_one_request(pipeline: Client, vision_agent: AgentProcess) -> None:
    doc = ask(pipeline, vision_agent, {"camera": ["front", "back"], "prompt": "Compare", "max_tokens": 2})
    assert doc["ok"] and [f["camera"] for f in doc["frames"]] == ["front", "back"]


def test_several_frames_over_time(pipeline: Client, vision_agent: AgentProcess) -> None:
    doc = ask(pipeline, vision_agent, {"camera": "front", "frames": 2, "interval_ms": 200,
                                       "prompt": "Did anything move?", "max_tokens": 2})
    assert doc["ok"]
    first, second = doc["frames"]
    assert second["seq"] > first["seq"]


def test_include_frame_returns_the_jpeg_the_model_saw(pipeline: Client, vision_agent: AgentProcess) -> None:
    doc = ask(pipeline, vision_agent, {"camera": "front", "prompt": "Look", "max_tokens": 2,
                                       "include_frame": True})
    jpeg = base64.b64decode(doc["frames"][0]["jpeg_base64"])
    assert jpeg[:2] == b"\xff\xd8"
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert max(decoded.shape[:2]) <= 336  # downscaled to images.longest_side


def test_text_only_on_the_vision_model(pipeline: Client, vision_agent: AgentProcess) -> None:
    doc = ask(pipeline, vision_agent, {"prompt": "Hello", "max_tokens": 3})
    assert doc["ok"] and "frames" not in doc and doc["usage"]["prompt_tokens"] < 50


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".webp"])
def test_payload_images_of_each_format_are_accepted(pipeline: Client, vision_agent: AgentProcess,
                                                    ext: str) -> None:
    doc = ask(pipeline, vision_agent, {"images": [encoded(ext)], "prompt": "What is it?", "max_tokens": 2})
    assert doc["ok"], doc
    still_answers(pipeline, vision_agent)


BAD_IMAGES = [
    (base64.b64encode(b"definitely not an image").decode(), "bad_image"),
    (encoded(".jpg")[:200], "bad_image"),  # truncated JPEG (still valid base64)
    (png_header(0, 0), "bad_image"),
    (png_header(60000, 60000), "too_large"),
    ("not base64 at all!!", "bad_image"),
    (base64.b64encode(b"GIF89a" + b"\x00" * 20).decode(), "bad_image"),
]


@pytest.mark.parametrize("image, code", BAD_IMAGES, ids=[f"img{i}" for i in range(len(BAD_IMAGES))])
def test_bad_images_get_an_error_and_the_next_request_is_answered(
        pipeline: Client, vision_agent: AgentProcess, image: str, code: str) -> None:
    rid = f"img-{uuid.uuid4().hex[:8]}"  # ids are remembered: a re-used one gets its first answer
    doc = ask(pipeline, vision_agent, {"id": rid, "images": [image], "prompt": "What?"})
    assert doc["ok"] is False and doc["error"]["code"] == code and doc["id"] == rid
    still_answers(pipeline, vision_agent)


@pytest.mark.parametrize("camera", ["garage", "../front", "/dev/video0", "front/../../etc"])
def test_unknown_or_path_like_camera_is_refused(pipeline: Client, vision_agent: AgentProcess,
                                                camera: str) -> None:
    doc = ask(pipeline, vision_agent, {"camera": camera, "prompt": "?"})
    assert doc["error"]["code"] == "bad_request" and "unknown camera" in doc["error"]["message"]
    still_answers(pipeline, vision_agent)


def test_too_many_images_is_too_large(pipeline: Client, vision_agent: AgentProcess) -> None:
    doc = ask(pipeline, vision_agent, {"camera": "front", "frames": 5, "prompt": "?"})
    assert doc["error"]["code"] == "too_large"


def test_status_shows_cameras(broker: Broker, vision_agent: AgentProcess) -> None:
    c = Client(broker.port)
    try:
        c.subscribe(vision_agent.status_topic)
        status = c.wait_for(lambda d: d.get("device_id") == vision_agent.device_id, 5)
        assert set(status["cameras"]) == {"front", "back"}
        assert status["cameras"]["front"]["state"] == "streaming"
    finally:
        c.close()


def test_text_model_given_an_image_answers_unsupported(
        broker: Broker, client: Client, clip: Path, start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent(broker, client, cameras={"front": {"source": str(clip)}})
    client.subscribe(agent.response_topic)
    for request in ({"id": "u1", "camera": "front", "prompt": "?"},
                    {"id": "u2", "images": [encoded(".png")], "prompt": "?"}):
        client.publish(agent.request_topic, json.dumps(request))
        doc = client.wait_for(lambda d: d.get("id") == request["id"])
        assert doc["error"]["code"] == "unsupported"
    client.publish(agent.request_topic, json.dumps({"id": "u3", "prompt": "hi", "max_tokens": 2}))
    assert client.wait_for(lambda d: d.get("id") == "u3")["ok"]


def wait_streaming(client: Client, agent: AgentProcess, camera: str) -> None:
    client.wait_for(lambda d: d.get("device_id") == agent.device_id
                    and d.get("cameras", {}).get(camera, {}).get("state") == "streaming", 30)


def test_live_stream_killed_then_restarted(broker: Broker, client: Client, vision_model: Path, stream: UdpStream,
                                           start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent(broker, client, model=vision_model, images__longest_side=336,
                        cameras={"gate": {"source": stream.url, "max_frame_age_ms": 500,
                                          "read_timeout_s": 2.0, "reconnect_min_s": 0.2,
                                          "reconnect_max_s": 1.0, "fresh_wait_ms": 3000}})
    wait_streaming(client, agent, "gate")
    client.subscribe(agent.response_topic)

    def ask_gate(rid: str) -> dict[str, Any]:
        client.publish(agent.request_topic, json.dumps({"id": rid, "camera": "gate", "prompt": "?",
                                                        "max_tokens": 2}))
        return client.wait_for(lambda d: d.get("id") == rid, 30)

    live = ask_gate("live")
    assert live["ok"], live
    assert live["frames"][0]["age_ms"] < 500 and live["frames"][0]["width"] == 640
    stream.stop()
    client.wait_for(lambda d: d.get("device_id") == agent.device_id
                    and d.get("cameras", {}).get("gate", {}).get("state") == "reconnecting", 30)
    started = time.monotonic()
    down = ask_gate("down")
    assert down["error"]["code"] in ("camera_unavailable", "stale_frame")
    assert time.monotonic() - started < 10
    stream.start()
    deadline = time.monotonic() + 30
    while not (back := ask_gate(f"back-{time.monotonic()}"))["ok"]:
        assert time.monotonic() < deadline, back
        time.sleep(0.5)


def test_stale_frame_when_the_stream_freezes(broker: Broker, client: Client, vision_model: Path, stream: UdpStream,
                                             start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent(broker, client, model=vision_model, images__longest_side=336,
                        cameras={"gate": {"source": stream.url, "max_frame_age_ms": 300,
                                          "read_timeout_s": 30.0, "fresh_wait_ms": 200}})
    wait_streaming(client, agent, "gate")
    client.subscribe(agent.response_topic)
    client.publish(agent.request_topic, json.dumps({"id": "ok1", "camera": "gate", "prompt": "?", "max_tokens": 2}))
    assert client.wait_for(lambda d: d.get("id") == "ok1", 30)["ok"]
    stream.pause()
    time.sleep(0.6)
    client.publish(agent.request_topic, json.dumps({"id": "st", "camera": "gate", "prompt": "?"}))
    doc = client.wait_for(lambda d: d.get("id") == "st", 30)
    assert doc["error"]["code"] == "stale_frame"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True, timeout=60)


def test_snapshot_saves_the_current_frame(vision_agent: AgentProcess, tmp_path: Path) -> None:
    out = tmp_path / "front.jpg"
    result = run_cli("snapshot", "--config", str(vision_agent.config), "--camera", "front", "-o", str(out))
    assert result.returncode == 0, result.stderr
    image = cv2.imread(str(out))
    assert image.shape == (240, 320, 3) and "320x240" in result.stdout
    assert run_cli("snapshot", "--config", str(vision_agent.config), "--camera", "nope").returncode == 78


def test_ask_with_camera_and_image_files(vision_agent: AgentProcess, broker: Broker, tmp_path: Path) -> None:
    picture = tmp_path / "p.png"
    picture.write_bytes(base64.b64decode(encoded(".png")))
    common = ("--config", str(vision_agent.config), "--port", str(broker.port), "--json", "--max-tokens", "2")
    by_camera = run_cli("ask", "What do you see?", "--camera", "front", *common)
    assert by_camera.returncode == 0, by_camera.stderr
    assert json.loads(by_camera.stdout)["frames"][0]["camera"] == "front"
    by_file = run_cli("ask", "What is this?", "--image", str(picture), *common)
    assert by_file.returncode == 0 and json.loads(by_file.stdout)["usage"]["prompt_tokens"] > 1000
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    refused = run_cli("ask", "What is this?", "--image", str(broken), *common)
    assert refused.returncode == 1 and "bad_image" in refused.stdout
