"""The size of a day of event history at one event a minute: 1,440 events, each a rule's JSON
answer and the snapshot the model saw (a real frame of an ffmpeg test pattern, re-encoded the way
the agent does with the default [images] settings), written through the agent's history store
into a fresh folder; then the database (checkpointed) and the snapshot files are measured.

    PYTHONPATH=$PWD python bench/history_size.py [--size 1280x720] [--events 1440]

Appends its table to bench/HISTORY.md."""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edge_agent.cameras.camera import Camera
from edge_agent.cameras.images import encode_frame
from edge_agent.delivery.history import Bounds, HistoryStore
from edge_agent.protocol.history import HistoryEvent
from edge_agent.settings.model import CameraSettings, ImageSettings

WIDE = Bounds(max_events=10**9, max_age_s=10**9, max_bytes=10**15)


def frame_jpeg(folder: Path, size: str) -> bytes:
    """One frame of a busy test pattern (testsrc2, harder to compress than a still yard)."""
    clip = folder / "clip.avi"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=5",
                    "-t", "1", "-c:v", "mjpeg", "-q:v", "3", str(clip)], check=True)
    camera = Camera("bench", CameraSettings(source=str(clip)))
    try:
        return encode_frame(camera.snapshot().image, ImageSettings())
    finally:
        camera.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="1280x720", help="camera frame size")
    parser.add_argument("--events", type=int, default=1440, help="events (1,440: a day at one a minute)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        jpeg = frame_jpeg(folder, args.size)
        store = HistoryStore(folder / "history.db", folder / "history")
        start, t0 = time.time() - args.events * 60, time.perf_counter()
        for n in range(args.events):
            store.add(HistoryEvent(f"watch-garage-{n:012x}", "garage", "front", start + n * 60, "schedule",
                                   '{"open":false}', {"open": False}, True, n == 0), jpeg, WIDE)
        write_ms = (time.perf_counter() - t0) * 1000 / args.events
        counted = store.totals()[1]
        store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store.close()
        db = sum(p.stat().st_size for p in folder.glob("history.db*"))
        images = sum(p.stat().st_size for p in (folder / "history").iterdir())
    row = (f"| {args.size} | {len(jpeg):,} | {args.events:,} | {db / 1e6:.2f} | {images / 1e6:.1f} | "
           f"{(db + images) / 1e6:.1f} | {counted / 1e6:.1f} | {write_ms:.2f} |")
    head = ("| frame | snapshot bytes | events | database MB | snapshots MB | total MB | counted by the bound MB "
            "| write ms/event |\n|---|---|---|---|---|---|---|---|")
    text = (f"\n## {time.strftime('%Y-%m-%d')} — `bench/history_size.py --size {args.size} --events {args.events}`\n\n"
            f"{platform.machine()}, Python {platform.python_version()}, default [images] "
            f"(longest_side 1008, jpeg_quality 90)\n\n{head}\n{row}\n")
    print(text)
    with (Path(__file__).parent / "HISTORY.md").open("a") as out:
        out.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
