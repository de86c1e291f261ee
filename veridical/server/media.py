"""Image URLs of chat requests -> decoded RGB images, within the server's limits.

Accepted sources, in order of trust:
- ``data:image/<type>;base64,<data>`` (always on): the encoded size is checked before decoding.
- a local path (``file:///abs/path``, ``/abs/path`` or a path relative to the folder), only when
  the server was started with ``--allowed-media-dir DIR``. The path is resolved with every symlink
  followed and must stay inside ``DIR`` (``..`` and links that leave it are refused before the
  file's existence is revealed), and must be a regular file.
- ``http(s)://`` only with ``--allow-remote-media``: fetched without following redirects, with a
  timeout and the byte limit enforced while reading.

Limits: ``max_image_bytes`` on the encoded image and ``max_image_pixels`` on its header size,
read before any pixel is decoded (a decompression bomb is refused without being expanded); both
answer 413. Anything else wrong (bad base64, not an image, a truncated file, a refused source)
answers 400 naming the message part and the fix.
"""

from __future__ import annotations

import base64
import binascii
import io
import stat
import urllib.parse
import warnings
from pathlib import Path

from PIL import Image

from veridical.errors import InputError
from veridical.images import load_image

from .errors import bad_request, too_large
from .settings import ServerSettings


async def fetch_image_bytes(url: str, settings: ServerSettings, param: str) -> bytes:
    """The encoded image ``url`` points at (see the module docstring)."""
    limit = settings.max_image_bytes
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(url, limit, param)
    if scheme in ("http", "https"):
        if not settings.allow_remote_media:
            raise bad_request(
                "remote image URLs are disabled on this server; send the image inline as a data "
                "URL (data:image/png;base64,...), or start the server with --allow-remote-media",
                param, "remote_media_disabled")
        return await _remote(url, limit, settings.remote_media_timeout_s, param)
    if scheme in ("", "file"):
        return _local(url, settings, param)
    raise bad_request(f"image URL scheme {scheme!r} is not supported; use a data URL "
                      "(data:image/png;base64,...)", param, "unsupported_media")


def _data_url(url: str, limit: int, param: str) -> bytes:
    header, sep, data = url.partition(",")
    if not sep:
        raise bad_request("malformed data URL: expected data:image/<type>;base64,<data>", param)
    media = header[5:].split(";")
    if not media[0].lower().startswith("image/") or "base64" not in (m.lower() for m in media[1:]):
        raise bad_request("data URL must be base64 image data: data:image/<type>;base64,<data>",
                          param)
    if len(data) // 4 * 3 > limit + 3:
        raise too_large(f"image is larger than the limit of {limit} bytes; send a smaller image",
                        param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("data URL is not valid base64", param) from None
    if len(raw) > limit:
        raise too_large(f"image has {len(raw)} bytes, more than the limit of {limit}", param)
    return raw


def _local(url: str, settings: ServerSettings, param: str) -> bytes:
    root_setting = settings.allowed_media_dir
    if root_setting is None:
        raise bad_request("local image paths are disabled on this server; send the image as a "
                          "data URL, or start the server with --allowed-media-dir DIR", param,
                          "local_media_disabled")
    if url.lower().startswith("file:"):
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise bad_request("file URLs must name a local path (file:///path)", param)
        text = urllib.parse.unquote(parsed.path)
    else:
        text = url
    if "\x00" in text:
        raise bad_request("image path contains a NUL byte", param)
    root = Path(root_setting).resolve()
    try:
        target = (root / text).resolve()  # follows every symlink; an absolute text replaces root
    except (OSError, RuntimeError):
        raise bad_request("image path cannot be resolved", param) from None
    if not target.is_relative_to(root):
        raise bad_request("image path is outside the allowed media directory", param,
                          "path_not_allowed")
    try:
        info = target.stat()
    except OSError:
        raise bad_request("image file not found in the allowed media directory", param,
                          "file_not_found") from None
    if not stat.S_ISREG(info.st_mode):
        raise bad_request("image path is not a regular file", param)
    limit = settings.max_image_bytes
    if info.st_size > limit:
        raise too_large(f"image file has {info.st_size} bytes, more than the limit of {limit}",
                        param)
    try:
        with open(target, "rb") as fh:
            raw = fh.read(limit + 1)
    except OSError:
        raise bad_request("image file cannot be read", param, "file_not_readable") from None
    if len(raw) > limit:
        raise too_large(f"image file is larger than the limit of {limit} bytes", param)
    return raw


async def _remote(url: str, limit: int, timeout: float, param: str) -> bytes:
    import httpx

    try:
        async with httpx.AsyncClient(follow_redirects=False, timeout=timeout) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise bad_request(f"fetching the image URL gave HTTP {response.status_code}",
                                      param, "remote_media_error")
                chunks, total = [], 0
                async for chunk in response.aiter_bytes():
                    total += len(chunk)
                    if total > limit:
                        raise too_large(f"remote image is larger than the limit of {limit} bytes",
                                        param)
                    chunks.append(chunk)
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        raise bad_request(f"fetching the image URL failed ({type(exc).__name__})", param,
                          "remote_media_error") from None
    return b"".join(chunks)


def decode_image(raw: bytes, max_pixels: int, param: str) -> Image.Image:
    """Decode ``raw`` to RGB, refusing more than ``max_pixels`` from the header (413) and
    anything PIL cannot read (400). CPU-bound: call it from a worker thread."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as probe:
                width, height = probe.size
    except Exception:  # PIL raises many types for garbage; all mean "not an image"
        raise bad_request("image data is not an image PIL can read (PNG, JPEG, ...)", param,
                          "invalid_image") from None
    if width * height > max_pixels:
        raise too_large(f"image is {width}x{height} pixels, more than the limit of {max_pixels}; "
                        "resize it first", param)
    try:
        return load_image(raw, max_pixels=max_pixels)
    except InputError as exc:
        raise bad_request(str(exc), param, "invalid_image") from None
    except Exception:
        raise bad_request("image data could not be decoded", param, "invalid_image") from None
