#!/usr/bin/env python3
"""What motion detection adds to one camera's CPU, on a live 640x480 15 fps stream.

    python bench/motion_cpu.py [--seconds 30] [--rounds 3] [--size 640x480] [--no-append]
    python bench/motion_cpu.py --zones [--seconds 20] [--rounds 2]   # masks and zones

The tests' live stream (tests/video.py: ffmpeg testsrc as MPEG-2 in MPEG-TS over loopback UDP;
testsrc scrolls, so motion is ON throughout). One continuous Camera with no request, motion
disabled, then the same with motion enabled (fps 5), alternating for --rounds rounds, never two
cameras at once; process CPU time / wall time over --seconds each. The difference is what motion
costs a camera, in percent of one core. During the enabled runs every detect() and every retrieve
(`cap.retrieve()`, the BGR conversion a look needs) is timed, wall and thread CPU. Last, on the
same stream: what a retrieve costs as BGR next to the raw luma plane (CAP_PROP_CONVERT_RGB off),
the cheaper path to a grayscale frame.

`--zones`: the same camera with motion on, as is, with a mask (a quarter of the frame), with 1 zone
and with 4 zones (the four quarters), alternating for --rounds rounds: process CPU and detect() per
call for each. testsrc moves everywhere, so every zone is reached at every look: the costly path
(the moving regions are drawn and ANDed with each zone).

Results are printed and appended, with the command and date, to bench/MOTION.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import threading
import time
from typing import Any, Callable

# First: the camera bench's helpers; importing it puts the repository and tests/ on sys.path.
from camera_cpu import REPO, SETTINGS, machine, measure, pct

import cv2

from edge_agent import log
from edge_agent.cameras.camera import Camera
from edge_agent.cameras.motion import MotionDetector
from edge_agent.settings.model import CameraSettings
from edge_agent.settings.watch import MotionSettings
from video import UdpStream

FPS, LOOK_FPS = 15, 5.0
SETTLE_S = 2.0  # after the first frame: drained, calibrated


class Timed:
    """Wraps a function; notes each call's wall and thread CPU time (ms)."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.wall_ms: list[float] = []
        self.cpu_ms: list[float] = []

    def __call__(self, *args: Any) -> Any:
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        try:
            return self.func(*args)
        finally:
            self.cpu_ms.append((time.thread_time() - cpu0) * 1000)
            self.wall_ms.append((time.perf_counter() - wall0) * 1000)

    def keep(self, calls: int) -> None:
        """Forget the calls after the first `calls`."""
        del self.wall_ms[calls:], self.cpu_ms[calls:]


QUARTERS = {"tl": [[0, 0], [0.5, 0], [0.5, 0.5], [0, 0.5]], "tr": [[0.5, 0], [1, 0], [1, 0.5], [0.5, 0.5]],
            "bl": [[0, 0.5], [0.5, 0.5], [0.5, 1], [0, 1]], "br": [[0.5, 0.5], [1, 0.5], [1, 1], [0.5, 1]]}
VARIANTS: dict[str, dict[str, Any]] = {
    "no mask, no zone": {},
    "mask (1 polygon)": {"motion": {"mask": [QUARTERS["tl"]]}},
    "1 zone": {"zones": {"tl": {"polygon": QUARTERS["tl"]}}},
    "4 zones": {"zones": {name: {"polygon": polygon} for name, polygon in QUARTERS.items()}},
}


def camera_cpu(url: str, seconds: float, motion: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    extra = extra or {}
    motion_settings = MotionSettings(enabled=motion, fps=LOOK_FPS, **extra.get("motion", {}))
    settings = CameraSettings(source=url, motion=motion_settings, zones=extra.get("zones", {}), **SETTINGS)
    cam = Camera("bench", settings)
    looks, retrieves = len(DETECT.wall_ms), len(RETRIEVE.wall_ms)
    cam.start()
    cam.fresh_frame()
    time.sleep(SETTLE_S)
    DETECT.keep(looks)  # the settling calls (and the request's retrieve) are not counted
    RETRIEVE.keep(retrieves)
    percent = measure(seconds, lambda end: time.sleep(max(0.0, end - time.monotonic())))
    info = cam.info()
    cam.stop()
    return {"cpu": percent, "fps": info["fps"], "motion": info["motion"],
            "looks": (len(DETECT.wall_ms) - looks) / seconds,
            "retrieves": (len(RETRIEVE.wall_ms) - retrieves) / seconds}


def retrieve_paths(url: str, frames: int = 300) -> dict[str, list[float]]:
    """Thread CPU ms of cap.retrieve() as BGR and as the raw luma plane, alternating frame by frame."""
    cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG)
    while not cap.read()[0]:  # until the first picture decodes: before it, a raw frame is 0x0
        pass
    out: dict[str, list[float]] = {"bgr": [], "luma": []}
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # "yuv420p treated as 8UC1"
    try:
        for n in range(frames):
            if not cap.grab():
                break
            name = "bgr" if n % 2 else "luma"
            cap.set(cv2.CAP_PROP_CONVERT_RGB, 1 if n % 2 else 0)
            cpu0 = time.thread_time()
            ok, image = cap.retrieve()
            out[name].append((time.thread_time() - cpu0) * 1000)
            assert ok and image.ndim == (3 if name == "bgr" else 2), image.shape
    finally:
        cv2.utils.logging.setLogLevel(level)
        cap.release()
    return out


def report(args: argparse.Namespace, rounds: list[tuple[dict[str, Any], dict[str, Any]]],
           detect: Timed, retrieve: Timed, paths: dict[str, list[float]]) -> str:
    def ms(values: list[float]) -> str:
        return f"{pct(values, 0.5):.2f} / {pct(values, 0.95):.2f}"

    diffs = [on["cpu"] - off["cpu"] for off, on in rounds]
    lines = [f"## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"`python bench/motion_cpu.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
             f"on {machine()}; stream: ffmpeg testsrc {args.size} {FPS} fps, MPEG-2 in MPEG-TS over "
             f"loopback UDP; motion fps {LOOK_FPS:g}, other motion settings default.", "",
             f"Process CPU over {args.seconds:g} s per run, percent of one core, runs alternating:", "",
             "| round | motion off | motion on | added by motion | camera fps | looks/s | retrieves/s | state |",
             "|---|---|---|---|---|---|---|---|"]
    for n, (off, on) in enumerate(rounds, 1):
        lines.append(f"| {n} | {off['cpu']:.2f} | {on['cpu']:.2f} | {on['cpu'] - off['cpu']:+.2f} "
                     f"| {on['fps']:.1f} | {on['looks']:.1f} | {on['retrieves']:.1f} | {on['motion']} |")
    lines += ["", f"Added by motion, median of {len(diffs)}: **{statistics.median(diffs):+.2f} %** of one core "
              f"(range {min(diffs):+.2f} to {max(diffs):+.2f}).", "",
              "Per call in the motion-on runs (p50 / p95 ms):", "",
              "| call | calls | wall | thread CPU |", "|---|---|---|---|",
              f"| `MotionDetector.detect()` | {len(detect.wall_ms)} | {ms(detect.wall_ms)} | {ms(detect.cpu_ms)} |",
              f"| retrieve (`cap.retrieve()`, BGR) | {len(retrieve.wall_ms)} | {ms(retrieve.wall_ms)} "
              f"| {ms(retrieve.cpu_ms)} |", "",
              f"Retrieve paths on the same stream, {len(paths['bgr'])} frames each, thread CPU p50 / p95 ms: "
              f"BGR {ms(paths['bgr'])}, raw luma plane (`CAP_PROP_CONVERT_RGB` off) {ms(paths['luma'])}."]
    return "\n".join(lines) + "\n"


def record(text: str, append: bool) -> None:
    print(text)
    if append:
        results = REPO / "bench" / "MOTION.md"
        results.write_text(results.read_text() + "\n" + text)


def zone_report(args: argparse.Namespace, runs: dict[str, list[tuple[dict[str, Any], list[float]]]]) -> str:
    def ms(values: list[float]) -> str:
        return f"{pct(values, 0.5):.2f} / {pct(values, 0.95):.2f}"

    lines = [f"## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC: masks and zones", "",
             f"`python bench/motion_cpu.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
             f"on {machine()}; stream: ffmpeg testsrc {args.size} {FPS} fps, MPEG-2 in MPEG-TS over "
             f"loopback UDP; motion on (fps {LOOK_FPS:g}), every zone reached at every look.", "",
             f"Process CPU over {args.seconds:g} s per run (percent of one core; median of {args.rounds}, "
             f"runs alternating) and `MotionDetector.detect()` thread CPU per call:", "",
             "| variant | process CPU % | runs | detect() calls | detect() CPU p50 / p95 ms |", "|---|---|---|---|---|"]
    for name, results in runs.items():
        cpu = [r["cpu"] for r, _ in results]
        calls = [c for _, cs in results for c in cs]
        lines.append(f"| {name} | {statistics.median(cpu):.2f} | {', '.join(f'{c:.2f}' for c in cpu)} "
                     f"| {len(calls)} | {ms(calls)} |")
    return "\n".join(lines) + "\n"


def zone_variants(url: str, args: argparse.Namespace) -> dict[str, list[tuple[dict[str, Any], list[float]]]]:
    runs: dict[str, list[tuple[dict[str, Any], list[float]]]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, extra in VARIANTS.items():
            before = len(DETECT.cpu_ms)
            result = camera_cpu(url, args.seconds, motion=True, extra=extra)
            runs[name].append((result, DETECT.cpu_ms[before:]))
    return runs


DETECT = Timed(MotionDetector.detect)
RETRIEVE = Timed(Camera._image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each CPU run")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of runs (off, on)")
    parser.add_argument("--size", default="640x480", help="the stream's frame size")
    parser.add_argument("--no-append", action="store_true", help="print only; leave bench/MOTION.md")
    parser.add_argument("--zones", action="store_true", help="compare no mask/zone, a mask, 1 and 4 zones")
    args = parser.parse_args()
    log.configure("warning", "console", sys.stderr)
    MotionDetector.detect = lambda detector, image: DETECT(detector, image)  # type: ignore[method-assign]
    Camera._image = staticmethod(RETRIEVE)  # type: ignore[method-assign,assignment]
    stream = UdpStream(size=args.size, fps=FPS)
    stream.start()
    try:
        if args.zones:
            record(zone_report(args, zone_variants(stream.url, args)), append=not args.no_append)
            return
        rounds = [(camera_cpu(stream.url, args.seconds, motion=False),
                   camera_cpu(stream.url, args.seconds, motion=True)) for _ in range(args.rounds)]
        paths = retrieve_paths(stream.url)
    finally:
        stream.stop()
    record(report(args, rounds, DETECT, RETRIEVE, paths), append=not args.no_append)


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
