#!/usr/bin/env python3
"""What one camera costs and how fresh its frames are, on a live 640x480 15 fps stream.

    python bench/camera_cpu.py [--seconds 20] [--samples 50] [--no-append]

A private ffmpeg sends testsrc as MPEG-2 in MPEG-TS over loopback UDP (tests/video.py). Measured
in this process, one after the other so that they never share the CPU:

1. idle CPU (process CPU time / wall time) of our continuous Camera with no request, next to a
   bare OpenCV `while True: cap.read()` loop and a `cap.grab()` loop on the same stream; then the
   same on a stream that is costlier to decode (moving noise at high quality, like a busy scene);
2. the age of the frame at the moment `fresh_frame()` returns (p50/p95 over --samples calls spaced
   randomly), and how long the call waited;
3. the on-demand mode: wall and CPU time per request (idle CPU is zero: no thread);
4. the glass-to-grab latency that a frame's age cannot show (what FFmpeg and the sender hold
   back): a second ffmpeg encodes frames that carry their send time as a bar code, with the
   default encoder settings and with a low-delay stream.

Results are printed and appended, with the command and date, to bench/CAMERA.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # reuse the tests' live stream
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from edge_agent import log  # noqa: E402
from edge_agent.cameras.camera import Camera  # noqa: E402
from edge_agent.settings.model import CameraSettings  # noqa: E402
from video import LOW_DELAY, UdpStream, ffmpeg, free_udp_port  # noqa: E402

W, H, FPS = 640, 480, 15
BARS = 32  # bits of the send time (ms, modulo 2^32), as 20-pixel bars across the top
SETTINGS = dict(open_timeout_s=5.0, read_timeout_s=2.0, fresh_wait_ms=4000)


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(seconds: float, body: Callable[[float], None]) -> float:
    """CPU percent of one core that `body(deadline)` uses in this process."""
    cpu0, wall0 = cpu_s(), time.monotonic()
    body(wall0 + seconds)
    return 100.0 * (cpu_s() - cpu0) / (time.monotonic() - wall0)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- 1. idle CPU -------------------------------------------------------------------------------
def idle_cpu(url: str, seconds: float) -> dict[str, float]:
    out: dict[str, float] = {}
    cam = Camera("bench", CameraSettings(source=url, **SETTINGS))
    cam.start()
    cam.fresh_frame()  # streaming, buffered frames drained
    out["camera"] = measure(seconds, lambda end: time.sleep(max(0.0, end - time.monotonic())))
    out["camera_fps"] = cam.info()["fps"]
    cam.stop()
    for name, step in (("read", lambda cap: cap.read()), ("grab", lambda cap: cap.grab())):
        cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG)
        cap.read()

        def loop(end: float, cap: Any = cap, step: Callable[[Any], Any] = step) -> None:
            while time.monotonic() < end:
                step(cap)

        out[name] = measure(seconds, loop)
        cap.release()
    return out


# --- 2. frame age at fresh_frame() ---------------------------------------------------------------
def frame_ages(url: str, samples: int) -> dict[str, list[float]]:
    cam = Camera("bench", CameraSettings(source=url, **SETTINGS))
    cam.start()
    cam.fresh_frame()
    ages, waits = [], []
    for _ in range(samples):
        time.sleep(random.uniform(0.05, 0.4))
        asked = time.monotonic()
        frame = cam.fresh_frame()
        now = time.monotonic()
        ages.append(frame.age_ms(now))
        waits.append((now - asked) * 1000)
    cam.stop()
    return {"age": ages, "wait": waits}


# --- 3. on demand --------------------------------------------------------------------------------
def on_demand(url: str, requests: int = 5) -> dict[str, float]:
    cam = Camera("bench", CameraSettings(source=url, mode="on_demand", **SETTINGS))
    walls, cpus, ages = [], [], []
    for _ in range(requests):
        cpu0, wall0 = cpu_s(), time.monotonic()
        frame = cam.fresh_frame()
        ages.append(frame.age_ms())
        walls.append(time.monotonic() - wall0)
        cpus.append(cpu_s() - cpu0)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
            "age_ms": statistics.median(ages)}


# --- 4. glass-to-grab latency ----------------------------------------------------------------------
def serve_barcode(port: int, low_delay: bool) -> None:
    """Child process: frames stamped with their send time, paced at FPS, into ffmpeg -> UDP."""
    proc = subprocess.Popen([ffmpeg(), "-nostdin", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "gray",
                             "-s", f"{W}x{H}", "-r", str(FPS), "-i", "-", "-c:v", "mpeg2video", "-q:v", "4",
                             *(LOW_DELAY if low_delay else ()), "-f", "mpegts",
                             f"udp://127.0.0.1:{port}?pkt_size=1316"], stdin=subprocess.PIPE)
    texture = (np.random.default_rng(1).random((2 * H, W)) * 255).astype(np.uint8)
    start, n = time.monotonic(), 0
    while True:
        time.sleep(max(0.0, start + n / FPS - time.monotonic()))
        image = texture[(n * 4) % H:(n * 4) % H + H].copy()  # moving content, like a camera
        stamp = int(time.time() * 1000) & 0xFFFFFFFF
        for bit in range(BARS):
            image[:40, bit * 20:(bit + 1) * 20] = 255 if stamp >> (BARS - 1 - bit) & 1 else 0
        try:
            proc.stdin.write(image.tobytes())  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        except BrokenPipeError:
            return
        n += 1


def read_stamp(image: np.ndarray) -> int:
    row = image[20, 10:BARS * 20:20].mean(axis=-1) if image.ndim == 3 else image[20, 10:BARS * 20:20]
    return int("".join("1" if v > 128 else "0" for v in row), 2)


def barcode_sender(low_delay: bool) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_udp_port()
    sender = subprocess.Popen([sys.executable, __file__, "--serve-barcode", str(port)]
                              + (["--low-delay"] if low_delay else []))
    return f"udp://127.0.0.1:{port}", sender


def glass_to_grab(samples: int, low_delay: bool) -> dict[str, list[float]]:
    url, sender = barcode_sender(low_delay)
    cam = Camera("bench", CameraSettings(source=url, **SETTINGS))
    try:
        cam.start()
        cam.fresh_frame()
        to_grab, to_return = [], []
        for _ in range(samples):
            time.sleep(random.uniform(0.05, 0.4))
            frame = cam.fresh_frame()
            now_ms = time.time() * 1000
            sent = read_stamp(frame.image)
            to_grab.append((int(frame.captured_at * 1000) - sent) & 0xFFFFFFFF)
            to_return.append((int(now_ms) - sent) & 0xFFFFFFFF)
        return {"grab": to_grab, "return": to_return}
    finally:
        cam.stop()
        sender.kill()
        sender.wait()


# --- report ------------------------------------------------------------------------------------------
def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    return f"{model}, {os.cpu_count()} CPUs, Python {platform.python_version()}, OpenCV {cv2.__version__}"


def report(args: argparse.Namespace, cpu: dict[str, float], busy: dict[str, float], ages: dict[str, list[float]],
           demand: dict[str, float], glass: dict[str, dict[str, list[float]]]) -> str:
    def p(values: list[float], digits: int = 0) -> str:
        return f"{pct(values, 0.5):.{digits}f} / {pct(values, 0.95):.{digits}f}"

    lines = [f"## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
             "", f"`python bench/camera_cpu.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
             f"on {machine()}; stream: ffmpeg testsrc {W}x{H} {FPS} fps, MPEG-2 in MPEG-TS over loopback UDP.",
             "", f"Idle CPU over {args.seconds:g} s (percent of one core, this process only):", "",
             "| reader | testsrc | moving noise, `-q:v 4` |", "|---|---|---|",
             f"| edge-agent Camera, continuous, no request ({cpu['camera_fps']:.1f} fps) | {cpu['camera']:.1f} "
             f"| {busy['camera']:.1f} |",
             f"| bare OpenCV `while True: cap.read()` | {cpu['read']:.1f} | {busy['read']:.1f} |",
             f"| bare OpenCV `while True: cap.grab()` | {cpu['grab']:.1f} | {busy['grab']:.1f} |",
             "", f"`fresh_frame()` on the live stream, {len(ages['age'])} calls spaced 50-400 ms at random "
             "(p50 / p95):", "",
             f"- frame age at return: {p(ages['age'], 1)} ms",
             f"- time the call waited: {p(ages['wait'], 1)} ms",
             "", f"On demand, per request (median of 5): {demand['wall_s']:.2f} s wall, "
             f"{demand['cpu_s'] * 1000:.0f} ms CPU, frame age {demand['age_ms']:.0f} ms at return; "
             "no CPU between requests.", "",
             "Glass-to-grab: time from the sender stamping a frame to our grab of it, and to "
             "`fresh_frame()` returning it (p50 / p95 ms):", "",
             "| sender stream | to grab | to return |", "|---|---|---|"]
    for name, values in glass.items():
        lines.append(f"| {name} | {p(values['grab'])} | {p(values['return'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each idle CPU run")
    parser.add_argument("--samples", type=int, default=50, help="fresh_frame() calls per age run")
    parser.add_argument("--no-append", action="store_true", help="print only; leave bench/CAMERA.md")
    parser.add_argument("--serve-barcode", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--low-delay", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_barcode:
        serve_barcode(args.serve_barcode, args.low_delay)
        return
    log.configure("warning", "console", sys.stderr)
    stream = UdpStream(size=f"{W}x{H}", fps=FPS)
    stream.start()
    try:
        cpu = idle_cpu(stream.url, args.seconds)
        ages = frame_ages(stream.url, args.samples)
        demand = on_demand(stream.url)
    finally:
        stream.stop()
    url, sender = barcode_sender(low_delay=False)
    try:
        busy = idle_cpu(url, args.seconds)
    finally:
        sender.kill()
        sender.wait()
    glass = {"mpeg2video defaults": glass_to_grab(args.samples, low_delay=False),
             "mpeg2video `-bf 0 -flags +low_delay`": glass_to_grab(args.samples, low_delay=True)}
    text = report(args, cpu, busy, ages, demand, glass)
    print(text)
    if not args.no_append:
        with (REPO / "bench" / "CAMERA.md").open("a") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
