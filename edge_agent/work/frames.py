"""Gathers the images of a request: fresh camera frames and payload images, each made safe
(decoded and re-encoded as JPEG) before the model sees it. Runs on the inference worker."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from edge_agent.cameras.camera_set import CameraSet
from edge_agent.health.status import utc_iso
from edge_agent.protocol import Request
from edge_agent.settings.model import ImageSettings


if TYPE_CHECKING:
    from edge_agent.cameras.camera import Frame


class ImageGatherer:
    def __init__(self, cameras: CameraSet, limits: ImageSettings) -> None:
        self._cameras = cameras
        self._limits = limits

    def gather(self, request: Request) -> tuple[list[bytes], list[dict[str, Any]] | None]:
        """JPEG bytes in prompt order (cameras first, then payload images) and the frames'
        metadata for the answer (None when no camera was used)."""
        # OpenCV and numpy (~40 MB) load with the first request that has images, not before.
        from edge_agent.cameras.images import crop_frame, decode_base64_image, encode_frame, sanitize

        jpegs: list[bytes] = []
        frames: list[tuple[Frame, bytes, dict[str, Any]]] = []
        for name in request.cameras:
            camera = self._cameras.get(name)
            taken = camera.frames(request.frames, request.interval_ms) if request.frames > 1 \
                else [camera.fresh_frame()]
            for frame in taken:
                image, cut = frame.image, {}
                if request.crop is not None:  # cut at full resolution, before the downscale
                    image, (x, y, wide, high) = crop_frame(frame.image, request.crop)
                    cut = {"width": wide, "height": high, "crop": {"x": x, "y": y, "width": wide, "height": high,
                                                                   "frame_width": frame.width,
                                                                   "frame_height": frame.height}}
                jpeg = encode_frame(image, self._limits)
                frames.append((frame, jpeg, cut))
                jpegs.append(jpeg)
        for text in request.images:
            jpegs.append(sanitize(decode_base64_image(text, self._limits.max_image_bytes), self._limits))
        if not request.cameras:
            return jpegs, None
        return jpegs, [self._describe(frame, jpeg, cut, request.include_frame) for frame, jpeg, cut in frames]

    @staticmethod
    def _describe(frame: Frame, jpeg: bytes, cut: dict[str, Any], include: bool) -> dict[str, Any]:
        """`cut`: a crop's width and height (what the model saw) and its box in the frame."""
        entry: dict[str, Any] = {"camera": frame.camera, "captured_at": utc_iso(frame.captured_at),
                                 "age_ms": round(frame.age_ms(), 1), "seq": frame.seq,
                                 "width": frame.width, "height": frame.height, **cut}
        if include:
            entry["jpeg_base64"] = base64.b64encode(jpeg).decode("ascii")
        return entry
