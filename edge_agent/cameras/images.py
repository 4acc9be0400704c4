"""Images made safe before ORT GenAI sees them.

ORT GenAI's image decoder ends the whole process on bytes that are not a JPEG or PNG it likes, so
every image (from a request or a camera) goes through here: the encoded size and the dimensions
its header declares are checked before anything is decoded (a 60000x60000 PNG header is refused
from its first 24 bytes), OpenCV decodes it, it is downscaled to `longest_side` and re-encoded as
a baseline JPEG. Formats OpenCV reads (BMP, WebP, GIF, TIFF, ...) are accepted; anything else is
`bad_image`, oversize is `too_large`.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct

from edge_agent.cameras.opencv_env import DECODE_PIXEL_BACKSTOP  # before cv2: it sets the decode pixel cap
import cv2
import numpy as np

from edge_agent.errors import BadImage, TooLarge
from edge_agent.settings.model import ImageSettings

DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)
HEADER_SCAN_BYTES = 65536  # how far into a file the box/segment walkers look
JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


# --- declared dimensions, read from headers without decoding --------------------------------
def _png(d: bytes) -> tuple[int, int] | None:
    if d[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", d[16:24])


def _jpeg(d: bytes) -> tuple[int, int] | None:
    i, end = 2, min(len(d), HEADER_SCAN_BYTES * 16)  # EXIF thumbnails can precede the SOF
    while i + 4 <= end:
        if d[i] != 0xFF:
            return None
        marker = d[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", d[i + 2:i + 4])
        if length < 2:
            return None
        if marker in JPEG_SOF:
            height, width = struct.unpack(">HH", d[i + 5:i + 9])
            return width, height
        i += 2 + length
    return None


def _gif(d: bytes) -> tuple[int, int] | None:
    return struct.unpack("<HH", d[6:10])


def _bmp(d: bytes) -> tuple[int, int] | None:
    (dib,) = struct.unpack("<I", d[14:18])
    if dib == 12:  # OS/2 BITMAPCOREHEADER
        return struct.unpack("<HH", d[18:22])
    width, height = struct.unpack("<ii", d[18:26])
    return abs(width), abs(height)  # a negative height means top-down rows


def _webp(d: bytes) -> tuple[int, int] | None:
    chunk = d[12:16]
    if chunk == b"VP8 " and d[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", d[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and d[20] == 0x2F:
        (bits,) = struct.unpack("<I", d[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return (int.from_bytes(d[24:27], "little") + 1, int.from_bytes(d[27:30], "little") + 1)
    return None


def _tiff(d: bytes) -> tuple[int, int] | None:
    order = "<" if d[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", d[4:8])
    (count,) = struct.unpack(order + "H", d[ifd:ifd + 2])
    found: dict[int, int] = {}
    for n in range(min(count, 512)):
        entry = d[ifd + 2 + 12 * n:ifd + 14 + 12 * n]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257):
            found[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), entry[8:10 if kind == 3 else 12])[0]
    return (found[256], found[257]) if len(found) == 2 else None


def _pnm(d: bytes) -> tuple[int, int] | None:
    head = d[:1024]
    if head[:2] == b"P7":  # PAM: WIDTH/HEIGHT lines
        width = re.search(rb"\nWIDTH\s+(\d+)", head)
        height = re.search(rb"\nHEIGHT\s+(\d+)", head)
        return (int(width[1]), int(height[1])) if width and height else None
    text = re.sub(rb"#[^\n]*", b" ", head[2:])
    numbers = re.match(rb"\s+(\d+)\s+(\d+)", text)
    return (int(numbers[1]), int(numbers[2])) if numbers else None


def _sun_raster(d: bytes) -> tuple[int, int] | None:
    return struct.unpack(">II", d[4:12])


def _hdr(d: bytes) -> tuple[int, int] | None:
    head = d[:HEADER_SCAN_BYTES]
    end = head.find(b"\n\n")
    line = head[end + 2:].split(b"\n", 1)[0] if end >= 0 else b""
    axes = dict((axis[1:2], int(n)) for axis, n in re.findall(rb"([+-][XY])\s+(\d+)", line))
    return (axes[b"X"], axes[b"Y"]) if b"X" in axes and b"Y" in axes else None


def _jp2(d: bytes) -> tuple[int, int] | None:
    at = d.find(b"ihdr", 0, 1024)
    if at < 0:
        return None
    height, width = struct.unpack(">II", d[at + 4:at + 12])
    return width, height


def _j2k(d: bytes) -> tuple[int, int] | None:
    xsiz, ysiz, xo, yo = struct.unpack(">IIII", d[8:24])
    return max(0, xsiz - xo), max(0, ysiz - yo)


def _heif(d: bytes) -> tuple[int, int] | None:
    """AVIF/HEIF: the largest 'ispe' (image spatial extent) box near the start."""
    best: tuple[int, int] | None = None
    at = d.find(b"ispe", 0, HEADER_SCAN_BYTES)
    while at >= 0:
        width, height = struct.unpack(">II", d[at + 8:at + 16])
        if best is None or width * height > best[0] * best[1]:
            best = (width, height)
        at = d.find(b"ispe", at + 4, HEADER_SCAN_BYTES)
    return best


_FORMATS = (
    ("png", lambda d: d.startswith(b"\x89PNG\r\n\x1a\n"), _png),
    ("jpeg", lambda d: d.startswith(b"\xff\xd8\xff"), _jpeg),
    ("gif", lambda d: d[:6] in (b"GIF87a", b"GIF89a"), _gif),
    ("bmp", lambda d: d.startswith(b"BM"), _bmp),
    ("webp", lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP", _webp),
    ("tiff", lambda d: d[:4] in (b"II*\x00", b"MM\x00*"), _tiff),
    ("pnm", lambda d: re.match(rb"P[1-7]|P[Ff]\s", d[:3]) is not None, _pnm),
    ("sunras", lambda d: d.startswith(b"\x59\xa6\x6a\x95"), _sun_raster),
    ("hdr", lambda d: d.startswith((b"#?RADIANCE", b"#?RGBE")), _hdr),
    ("jp2", lambda d: d.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n"), _jp2),
    ("j2k", lambda d: d.startswith(b"\xff\x4f\xff\x51"), _j2k),
    ("heif", lambda d: d[4:8] == b"ftyp", _heif),
)


def declared_size(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) as the header declares them, read without decoding; None when the
    format is not one this reader knows or its header is cut short or malformed."""
    for name, matches, read in _FORMATS:
        if matches(data):
            try:
                size = read(data)
            except (struct.error, IndexError, ValueError, KeyError):
                return None
            return (name, int(size[0]), int(size[1])) if size else None
    return None


# --- sanitizing ------------------------------------------------------------------------------
def sanitize(data: bytes, limits: ImageSettings) -> bytes:
    """Any image a user may send -> a JPEG that ORT GenAI can take; BadImage or TooLarge else."""
    if len(data) > limits.max_image_bytes:
        raise TooLarge(f"image is {len(data)} bytes; the limit is {limits.max_image_bytes}")
    if not data:
        raise BadImage("image is empty")
    declared = declared_size(data)
    if declared is not None:
        fmt, width, height = declared
        if width == 0 or height == 0:
            raise BadImage(f"{fmt} image declares {width}x{height} pixels")
        _check_pixels(width, height, limits, f"{fmt} image declares")
    image = _decode(data)
    _check_pixels(image.shape[1], image.shape[0], limits, "image has")
    return encode_frame(image, limits)


def encode_frame(image: np.ndarray, limits: ImageSettings) -> bytes:
    """A BGR frame -> JPEG bytes, downscaled so that its longest side is at most `longest_side`."""
    height, width = image.shape[:2]
    longest = max(width, height)
    if longest > limits.longest_side:
        scale = limits.longest_side / longest
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return _jpeg_bytes(image, limits.jpeg_quality)


def crop_frame(image: np.ndarray, box: tuple[float, float, float, float]
               ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The part of a frame inside `box` (x0, y0, x1, y1 relative), at least one pixel, and that
    part in pixels (x, y, width, height). A view: cut before encoding, at full resolution."""
    high, wide = image.shape[:2]
    x0, x1 = min(wide - 1, int(box[0] * wide)), max(1, round(box[2] * wide))
    y0, y1 = min(high - 1, int(box[1] * high)), max(1, round(box[3] * high))
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    return image[y0:y1, x0:x1], (x0, y0, x1 - x0, y1 - y0)


def fit_jpeg(jpeg: bytes, max_bytes: int) -> bytes:
    """A JPEG of at most `max_bytes`: as it is when it fits, else re-encoded at lower quality,
    then smaller (three quarters of the size a step). BadImage when even a tiny one does not fit."""
    if len(jpeg) <= max_bytes:
        return jpeg
    image = _decode(jpeg)
    for quality in (75, 60, 45):
        out = _jpeg_bytes(image, quality)
        if len(out) <= max_bytes:
            return out
    while min(image.shape[:2]) > 16:
        image = cv2.resize(image, (max(1, image.shape[1] * 3 // 4), max(1, image.shape[0] * 3 // 4)),
                           interpolation=cv2.INTER_AREA)
        out = _jpeg_bytes(image, 45)
        if len(out) <= max_bytes:
            return out
    raise BadImage(f"the image does not fit in {max_bytes} bytes as a JPEG")


def _jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise BadImage("image could not be encoded as JPEG")
    return buf.tobytes()


def _check_pixels(width: int, height: int, limits: ImageSettings, what: str) -> None:
    if width * height > limits.max_image_pixels:
        raise TooLarge(f"{what} {width}x{height} pixels; the limit is {limits.max_image_pixels} pixels")


def _decode(data: bytes) -> np.ndarray:
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        if "MAX_IMAGE_PIXELS" in str(exc):
            raise TooLarge(f"image exceeds the decoder's limit of {DECODE_PIXEL_BACKSTOP} pixels") from exc
        raise BadImage("image could not be decoded") from exc
    if image is None or image.size == 0:
        raise BadImage("not an image format that can be decoded (or the data is corrupt or cut short)")
    return image


def decode_base64_image(text: str, max_bytes: int) -> bytes:
    """Base64 (optionally a `data:image/...;base64,` URL) -> bytes; BadImage or TooLarge else.
    The size is checked from the text's length before anything is decoded."""
    if not isinstance(text, str):
        raise BadImage("image must be base64 text")
    text = text.strip()
    if text[:5].lower() == "data:":
        prefix = DATA_URL.match(text)
        if prefix is None:
            raise BadImage("data URL must look like data:image/<type>;base64,<data>")
        text = text[prefix.end():]
    padding = len(text) - len(text.rstrip("="))
    if len(text) // 4 * 3 - min(padding, 2) > max_bytes:
        raise TooLarge(f"image is over {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadImage("image is not valid base64") from exc
    if not data:
        raise BadImage("image is empty")
    return data
