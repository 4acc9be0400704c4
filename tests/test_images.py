"""Images made safe before ORT GenAI sees them: every accepted format comes out as a JPEG, every
bad one is BadImage or TooLarge, and a huge declared size is refused without decoding."""

from __future__ import annotations

import base64
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from edge_agent.cameras import images
from edge_agent.errors import BadImage, TooLarge
from edge_agent.cameras.images import declared_size, decode_base64_image, encode_frame, sanitize
from edge_agent.settings.model import ImageSettings

LIMITS = ImageSettings()
FORMATS = [".jpg", ".png", ".bmp", ".webp", ".gif", ".tiff", ".ppm", ".jp2"]


def picture(width: int = 320, height: int = 200) -> np.ndarray:
    """A test card with structure (so that JPEG and downscaling have something to keep)."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = (0, 0, 255)
    image[: height // 2, :, 1] = 200
    cv2.circle(image, (width // 2, height // 2), min(width, height) // 4, (255, 255, 255), -1)
    return image


def encoded(ext: str, width: int = 320, height: int = 200) -> bytes:
    ok, buf = cv2.imencode(ext, picture(width, height))
    assert ok
    return buf.tobytes()


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk by hand: what a decompression bomb starts with."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", len(idat)) + b"IDAT" + idat
            + struct.pack(">I", zlib.crc32(b"IDAT" + idat)))


def decoded(jpeg: bytes) -> np.ndarray:
    assert jpeg[:3] == b"\xff\xd8\xff", "not a JPEG"
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(images.cv2, "imdecode", refuse)


# --- accepted ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", FORMATS)
def test_every_format_opencv_reads_comes_out_as_jpeg(ext: str) -> None:
    out = decoded(sanitize(encoded(ext), LIMITS))
    assert out.shape == (200, 320, 3)
    assert out[100, 10, 2] > 200 and out[150, 300, 0] < 60  # the red half stayed red


@pytest.mark.parametrize("ext", FORMATS)
def test_declared_size_reads_the_header(ext: str) -> None:
    fmt, width, height = declared_size(encoded(ext, 123, 45)) or ("?", 0, 0)
    assert (width, height) == (123, 45), fmt


def test_declared_size_of_handcrafted_headers() -> None:
    vp8x = b"RIFF\x00\x00\x00\x00WEBPVP8X" + b"\x0a\x00\x00\x00" + b"\x00" * 4 + (59999).to_bytes(3, "little") * 2
    assert declared_size(vp8x) == ("webp", 60000, 60000)
    bmp_top_down = b"BM" + b"\x00" * 12 + struct.pack("<Iii", 40, 640, -480)
    assert declared_size(bmp_top_down) == ("bmp", 640, 480)
    assert declared_size(b"GIF89a" + struct.pack("<HH", 65535, 65535)) == ("gif", 65535, 65535)
    assert declared_size(b"P6\n# comment\n7000 8000\n255\n") == ("pnm", 7000, 8000)
    assert declared_size(b"\xff\xd8\xff") is None  # cut short
    assert declared_size(b"hello") is None


def test_downscaled_to_the_longest_side_and_never_upscaled() -> None:
    limits = ImageSettings(longest_side=500)
    assert decoded(sanitize(encoded(".png", 2000, 1000), limits)).shape[:2] == (250, 500)
    assert decoded(sanitize(encoded(".png", 800, 1600), limits)).shape[:2] == (500, 250)
    assert decoded(sanitize(encoded(".png", 300, 100), limits)).shape[:2] == (100, 300)


def test_encode_frame_downscales_a_camera_frame() -> None:
    out = decoded(encode_frame(picture(1920, 1080), ImageSettings(longest_side=640, jpeg_quality=70)))
    assert out.shape == (360, 640, 3)


# --- refused -----------------------------------------------------------------------------------
@pytest.mark.parametrize("data", [b"", b"garbage" * 100, b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0" + b"\x00" * 200,
                                  b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"%PDF-1.4\n" + b"x" * 500])
def test_what_is_not_an_image_is_bad_image(data: bytes) -> None:
    with pytest.raises(BadImage):
        sanitize(data, LIMITS)


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp"])
def test_truncated_image_is_bad_image(ext: str) -> None:
    data = encoded(ext, 640, 480)
    with pytest.raises(BadImage):
        sanitize(data[: len(data) // 2], LIMITS)


def test_zero_by_zero_png_is_bad_image(no_decoding: None) -> None:
    with pytest.raises(BadImage, match="0x0"):
        sanitize(png_header(0, 0), LIMITS)


def test_huge_declared_png_is_refused_without_decoding(no_decoding: None) -> None:
    with pytest.raises(TooLarge, match="60000x60000"):
        sanitize(png_header(60000, 60000), LIMITS)


def test_pixel_limit_applies_to_real_images() -> None:
    with pytest.raises(TooLarge):
        sanitize(encoded(".jpg", 320, 200), ImageSettings(max_image_pixels=320 * 199))
    assert sanitize(encoded(".jpg", 320, 200), ImageSettings(max_image_pixels=320 * 200))


def test_oversize_bytes_are_too_large(no_decoding: None) -> None:
    with pytest.raises(TooLarge, match="bytes"):
        sanitize(b"\x00" * 2048, ImageSettings(max_image_bytes=2047))


def test_opencv_decoder_has_its_own_pixel_cap() -> None:
    """Formats whose header we cannot read still meet OpenCV's cap, set before cv2 loads."""
    code = ("import edge_agent.cameras.images, cv2, numpy, sys\n"
            "data = numpy.frombuffer(sys.stdin.buffer.read(), numpy.uint8)\n"
            "try:\n    cv2.imdecode(data, cv2.IMREAD_COLOR)\nexcept cv2.error as exc:\n"
            "    print('capped' if 'MAX_IMAGE_PIXELS' in str(exc) else exc)\n")
    out = subprocess.run([sys.executable, "-c", code], input=png_header(9000, 9000), capture_output=True,
                         check=True)
    assert out.stdout.strip() == b"capped"


# --- base64 ------------------------------------------------------------------------------------
def test_base64_and_data_urls() -> None:
    data = encoded(".png")
    text = base64.b64encode(data).decode()
    assert decode_base64_image(text, LIMITS.max_image_bytes) == data
    assert decode_base64_image(f"data:image/png;base64,{text}", LIMITS.max_image_bytes) == data
    assert decode_base64_image(f"  {text}\n", LIMITS.max_image_bytes) == data


@pytest.mark.parametrize("text", ["not base64!", "abc", "YWJj\nZGVm", "ＡＢＣＤ", "", "====",
                                  "data:text/plain;base64,YWJj", "data:image/png,YWJj", "data:image/png;base64,@@@@"])
def test_invalid_base64_is_bad_image(text: str) -> None:
    with pytest.raises(BadImage):
        decode_base64_image(text, LIMITS.max_image_bytes)


def test_base64_size_is_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images.base64, "b64decode", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(TooLarge):
        decode_base64_image("A" * 4000, 2999)
    monkeypatch.undo()
    assert len(decode_base64_image("A" * 4000, 3000)) == 3000


# --- fuzz --------------------------------------------------------------------------------------
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEEDS = [encoded(ext, 64, 48) for ext in FORMATS] + [png_header(64, 48)]


def _outcome(data: bytes) -> None:
    try:
        out = sanitize(data, ImageSettings(max_image_bytes=1 << 20, max_image_pixels=1 << 20))
    except (BadImage, TooLarge):
        return
    assert out[:3] == b"\xff\xd8\xff"


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes(data: bytes) -> None:
    _outcome(data)


@FUZZ
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=8),
       st.integers(0, 1 << 16))
def test_fuzz_damaged_images(seed: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(seed)
    for at, value in flips:
        data[at % len(data)] = value
    _outcome(bytes(data[: max(1, len(data) - cut % len(data))]))
