"""Real video for the camera tests and bench/camera_cpu.py: a live stream that ffmpeg serves over
UDP on loopback (killable, pausable, restartable on the same port) and short clips written at test
time. ffmpeg must be installed (scripts/setup.sh installs it)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Iterator

# mpeg2video in MPEG-TS over UDP: every ffmpeg build has both; OpenCV opens it in ≈1.5 s.
# LOW_DELAY makes the encoder flag its stream low-delay, so the decoder holds no frame back.
LOW_DELAY = ("-bf", "0", "-flags", "+low_delay")


def ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise RuntimeError("ffmpeg is not installed (apt-get install ffmpeg)")
    return exe


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class UdpStream:
    """`ffmpeg -re -f lavfi -i testsrc ... -f mpegts udp://127.0.0.1:PORT`, as a live camera."""

    def __init__(self, size: str = "640x480", fps: int = 15, extra: tuple[str, ...] = ()) -> None:
        self.port = free_udp_port()
        self.size, self.fps, self.extra = size, fps, extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"udp://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [ffmpeg(), "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi",
             "-i", f"testsrc=size={self.size}:rate={self.fps}", "-c:v", "mpeg2video", *self.extra,
             "-f", "mpegts", f"{self.url}?pkt_size=1316"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused ffmpeg cannot act on SIGKILL's cleanup
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


def running_stream() -> Iterator[UdpStream]:
    """For a fixture: a live stream, stopped at teardown."""
    stream = UdpStream()
    stream.start()
    yield stream
    stream.stop()


def make_clip(path: Path, seconds: float = 1.0, size: str = "320x240", fps: int = 15) -> Path:
    """A short testsrc clip (MPEG-4 in MP4) written with ffmpeg."""
    subprocess.run([ffmpeg(), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi",
                    "-i", f"testsrc=size={size}:rate={fps}", "-t", str(seconds), "-c:v", "mpeg4",
                    str(path)], check=True)
    return path


# Still and moving scenes for motion detection: one frozen testsrc frame, as MJPEG at quality 2.
# Every frame of a still part encodes to the same bytes, so a looping still clip holds no change.
FROZEN = "trim=end_frame=1,loop=loop=-1:size=1,setpts=N/FRAME_RATE/TB"


def _write_scene(path: Path, seconds: float, size: str, fps: int, graph: str, inputs: tuple[str, ...] = ()) -> Path:
    subprocess.run([ffmpeg(), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi",
                    "-i", f"testsrc=size={size}:rate={fps}", *inputs, "-filter_complex", graph,
                    "-frames:v", str(round(seconds * fps)), "-c:v", "mjpeg", "-q:v", "2", str(path)], check=True)
    return path


def make_still_clip(path: Path, seconds: float = 4, size: str = "640x480", fps: int = 15) -> Path:
    """A textured scene that never changes (MJPEG in AVI: name the path *.avi)."""
    return _write_scene(path, seconds, size, fps, f"[0:v]{FROZEN}")


def make_motion_clip(path: Path, still_s: float = 3, moving_s: float = 3, size: str = "640x480",
                     fps: int = 15) -> Path:
    """The still scene for `still_s`, then a box (white in black, a fifth of the height) crossing it
    left to right at mid-height for `moving_s`: it enters at `still_s` and has left at the end, so
    the clip loops back to the still scene without a jump."""
    side = int(size.split("x")[1]) // 5
    box = f"color=c=black:size={side}x{side}:rate={fps}"
    graph = (f"[0:v]{FROZEN}[scene];[1:v]drawbox=x={side // 4}:y={side // 4}:w={side // 2}:h={side // 2}"
             f":color=white:t=fill[box];[scene][box]overlay=x='-w+(W+w)*(t-{still_s})/{moving_s}'"
             f":y=(H-h)/2:enable='gte(t,{still_s})'")
    return _write_scene(path, still_s + moving_s, size, fps, graph, ("-f", "lavfi", "-i", box))


def make_corner_clip(path: Path, seconds: float = 4, size: str = "320x240", fps: int = 15) -> Path:
    """The still scene with a box (black with a white centre, an eighth of the height) that keeps
    moving inside the top-left quarter, and nothing else ever changing: motion in one region only."""
    side = int(size.split("x")[1]) // 8
    box = f"color=c=black:size={side}x{side}:rate={fps}"
    graph = (f"[0:v]{FROZEN}[scene];[1:v]drawbox=x={side // 4}:y={side // 4}:w={side // 2}:h={side // 2}"
             f":color=white:t=fill[box];[scene][box]overlay=x='(W/2-w)*(0.5+0.5*sin(3*t))'"
             f":y='(H/2-h)*(0.5+0.5*cos(2*t))'")
    return _write_scene(path, seconds, size, fps, graph, ("-f", "lavfi", "-i", box))
