"""OpenCV's process-wide settings, in one place. OpenCV reads a few settings from environment
variables, not per capture; this module sets them, and every module that loads cv2 imports it
first (images.py, camera.py).

- OPENCV_IO_MAX_IMAGE_PIXELS, the decode pixel cap: read once, when cv2 is loaded (default 2^30
  pixels, far too many for an edge box). It backs up images.py's header check. Set on import; a
  value already in the environment is kept.
- OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT, how long a V4L2 read waits for a frame (whole seconds,
  default 10). FFmpeg cameras take their open/read timeouts per capture (camera.py passes
  CAP_PROP_OPEN/READ_TIMEOUT_MSEC); OpenCV's V4L2 backend has no such property or parameter
  (cap_v4l.cpp handles neither) and reads this variable into a static at its first wait for a
  frame, once per process. So it is the largest `read_timeout_s` of the V4L2 cameras known when
  the first V4L2 device opens (CameraSet announces them all before starting any), and stays so.
"""

from __future__ import annotations

import math
import os
import threading

from edge_agent.log import get_logger

log = get_logger("camera")

DECODE_PIXEL_BACKSTOP = 1 << 26
V4L_SELECT_TIMEOUT = "OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT"

os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(DECODE_PIXEL_BACKSTOP))


class _V4lTimeout:
    """The V4L2 read timeout of this process: raised while no V4L2 device has opened, then fixed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: int | None = None
        self.fixed = False

    def want(self, read_timeout_s: float, *, fix: bool = False) -> int:
        """Raise it to cover `read_timeout_s` unless it is fixed; returns the value in force.
        `fix`: a V4L2 device opens next, so OpenCV may read it from then on."""
        wanted = max(1, math.ceil(read_timeout_s))
        with self._lock:
            if not self.fixed and (self.seconds is None or wanted > self.seconds):
                self.seconds = wanted
                os.environ[V4L_SELECT_TIMEOUT] = str(wanted)  # replaces any value it had
            elif self.seconds is not None and wanted > self.seconds and not fix:
                log.warning("camera.v4l2_timeout_fixed", wanted_s=wanted, in_force_s=self.seconds,
                            reason="OpenCV reads it once per process: a restart applies it")
            self.fixed = self.fixed or fix
            assert self.seconds is not None
            return self.seconds


v4l_timeout = _V4lTimeout()
