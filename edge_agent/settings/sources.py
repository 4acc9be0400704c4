"""Camera sources as the settings name them: their kind, a form fit for logs, their problems,
the back-off between reopens. Pure logic; camera.py opens them."""

from __future__ import annotations

import re
from pathlib import Path

from edge_agent.settings.base import redact
from edge_agent.settings.model import CameraSettings

NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtp", "srt", "http", "https", "udp", "tcp")


def source_kind(source: str | int) -> str:
    """"v4l2", "file", "network", "gstreamer" or "unknown"."""
    if isinstance(source, int) or source.isdigit() or source.startswith("/dev/video"):
        return "v4l2"
    if "!" in source:
        return "gstreamer"
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", source)
    if scheme:
        return "network" if scheme[1].lower() in NETWORK_SCHEMES else "unknown"
    return "file"


def source_problems(name: str, settings: CameraSettings, gstreamer: bool) -> list[str]:
    """One line per problem of a camera's settings; `gstreamer`: OpenCV can open pipelines."""
    where, source, kind = f"cameras.{name}.source", settings.source, source_kind(settings.source)
    problems = []
    if kind == "unknown":
        problems.append(f"{where}: unknown source kind {redact(source)!r}: expected a V4L2 index or "
                        f"/dev/videoN, a file, a {'/'.join(NETWORK_SCHEMES)} URL or a GStreamer pipeline")
    elif kind == "gstreamer" and not gstreamer:
        problems.append(f"{where}: this OpenCV has no GStreamer support; install a GStreamer-enabled "
                        "OpenCV (e.g. the distribution's python3-opencv or a JetPack OpenCV) in place of "
                        "opencv-python(-headless), or use a V4L2 device or an rtsp:// URL")
    elif kind == "v4l2" and isinstance(source, int) and source < 0:
        problems.append(f"{where}: a V4L2 index must be 0 or more (got {source})")
    elif kind == "file" and not Path(str(source)).is_file():
        problems.append(f"{where}: no such file {source!r} (a source that is not a URL, /dev/videoN "
                        "or GStreamer pipeline is read as a file)")
    if settings.reconnect_max_s < settings.reconnect_min_s:
        problems.append(f"cameras.{name}.reconnect_max_s: must not be below reconnect_min_s")
    return problems

