"""Real video for the camera tests and bench/camera_cpu.py: a live stream that ffmpeg serves over
UDP on loopback (killable, pausable, restartable on the same port) and short clips written at test
time. ffmpeg must be installed (scripts/setup.sh installs it)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path

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


def make_clip(path: Path, seconds: float = 1.0, size: str = "320x240", fps: int = 15) -> Path:
    """A short testsrc clip (MPEG-4 in MP4) written with ffmpeg."""
    subprocess.run([ffmpeg(), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi",
                    "-i", f"testsrc=size={size}:rate={fps}", "-t", str(seconds), "-c:v", "mpeg4",
                    str(path)], check=True)
    return path
