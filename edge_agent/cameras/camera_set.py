"""The configured cameras, by name: requests can only name these, never a path or device."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from edge_agent.errors import BadRequest, ConfigError
from edge_agent.log import get_logger
from edge_agent.cameras.opencv_env import v4l_timeout
from edge_agent.settings.model import CameraSettings
from edge_agent.settings.sources import source_kind, source_problems

if TYPE_CHECKING:
    from edge_agent.cameras.camera import Camera

log = get_logger("camera")


def validate_cameras(settings: Any) -> None:
    """Every camera problem at once, as a ConfigError. Takes Settings or its `cameras` mapping.
    A missing /dev/videoN is no error: USB cameras come and go, and are reopened."""
    _validated(getattr(settings, "cameras", settings))


def _validated(cameras: Mapping[str, CameraSettings]) -> Any:
    """camera.py (OpenCV and numpy, ~40 MB) is loaded only by an agent that has cameras."""
    if not cameras:
        return None
    from edge_agent.cameras import camera

    gstreamer = camera.has_gstreamer()
    problems = [line for name, cam in cameras.items() for line in source_problems(name, cam, gstreamer)]
    if problems:
        raise ConfigError(problems)
    return camera


def _announce_v4l2_timeouts(cameras: Mapping[str, CameraSettings]) -> None:
    """Before any camera starts: OpenCV has one V4L2 read timeout per process (see opencv_env),
    so it covers the largest of them, not the first camera's to open."""
    for settings in cameras.values():
        if source_kind(settings.source) == "v4l2":
            v4l_timeout.want(settings.read_timeout_s)


class CameraSet:
    """The cameras of the settings, by name; requests can only name these."""

    def __init__(self, cameras: Mapping[str, CameraSettings]) -> None:
        module = _validated(cameras)
        _announce_v4l2_timeouts(cameras)
        self._cameras: dict[str, Camera] = {name: module.Camera(name, cam) for name, cam in cameras.items()}
        self._motion_listener: Callable[..., None] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._cameras)

    def get(self, name: str) -> Camera:
        camera = self._cameras.get(name) if isinstance(name, str) else None
        if camera is None:
            raise BadRequest(f"unknown camera {name!r}")
        return camera

    def set_motion_listener(self, listener: Callable[..., None] | None) -> None:
        """`listener(camera, "ON"|"OFF")` on every motion change of any camera (with `zone=name`
        for a zone's), now and after a
        reconfigure; called from capture threads, so it must only enqueue. A camera tells "OFF"
        once it streams, and "OFF" when it stops or fails while ON."""
        self._motion_listener = listener
        for camera in self._cameras.values():
            camera.set_motion_listener(listener)

    def start_all(self) -> None:
        for camera in self._cameras.values():
            camera.start()

    def stop_all(self) -> None:
        """Signal every camera first, then wait: hung reads overlap instead of adding up."""
        cameras = list(reversed(self._cameras.values()))
        for camera in cameras:
            camera.signal_stop()
        for camera in cameras:
            camera.join()

    def info(self) -> dict[str, dict[str, Any]]:
        return {name: camera.info() for name, camera in self._cameras.items()}

    def reconfigure(self, cameras: Mapping[str, CameraSettings]) -> None:
        """Reopen only what changed: removed and changed cameras stop, new and changed start."""
        module = _validated(cameras)
        _announce_v4l2_timeouts(cameras)
        stale = [n for n, cam in self._cameras.items() if cameras.get(n) != cam.settings]
        for name in stale:
            self._cameras.pop(name).stop()
        for name, settings in cameras.items():
            if name not in self._cameras:
                camera = module.Camera(name, settings)
                camera.set_motion_listener(self._motion_listener)
                camera.start()
                self._cameras = {**self._cameras, name: camera}  # readers see old or new dict
        log.info("cameras.reconfigured", stopped=stale, running=sorted(self._cameras))
