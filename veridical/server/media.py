"""Image URLs of chat requests -> decoded RGB images, within the server's limits.

Accepted sources, in order of trust:
- ``data:image/<type>;base64,<data>`` (always on): the encoded size is checked before decoding.
- a local path (``file:///abs/path``, ``/abs/path`` or a path relative to the folder), only when
  the server was started with ``--allowed-media-dir DIR``. The path is resolved with every symlink
  followed and must stay inside ``DIR`` (``..`` and links that leave it are refused before the
  file's existence is revealed), and must be a regular file.
- ``http(s)://`` only with ``--allow-remote-media``. The host is resolved once, every address it
  resolves to must be public (not loopback, private, link-local, shared, multicast, reserved or
  unspecified, also when written inside an IPv6 address: mapped, 6to4, Teredo, NAT64) unless
  ``--allow-private-media-hosts``, and the connection goes to the address that was checked (the
  ``Host`` header and TLS server name stay the URL's), so a second DNS answer cannot redirect it
  (no DNS rebinding). Redirects are not followed; no proxy from the environment is used; the
  byte limit is enforced while reading; ``remote_media_timeout_s`` bounds the whole fetch
  (resolving, connecting, headers, body), not each read. Every failure (a refused address, a
  name that does not resolve, a closed port, a timeout, a non-200 answer, a redirect) answers the
  same 400, so callers cannot map hosts or ports through the server; only an image larger than
  the limit answers 413.

Decoding (:func:`decode_image`, CPU-bound: call it from a worker thread): only PNG, JPEG, WebP,
GIF (its first frame) and BMP are opened; no other PIL plugin is ever tried (EPS, for one, runs
Ghostscript). From the header alone, before any pixel is decoded or resized, the image must fit
``max_image_bytes`` (encoded), ``max_image_pixels`` (as sent, and as the model's processor will
resize it: :func:`processed_size`) and ``max_image_aspect_ratio``; each answers 413 naming the
size and the limit. Anything else wrong (bad base64, not an image, a format not accepted, a
truncated file) answers 400 naming the message part and the fix. No message quotes PIL's or any
other library's own error text.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import logging
import math
import socket
import stat
import urllib.parse
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import ApiError, bad_request, too_large
from .settings import ServerSettings

logger = logging.getLogger(__name__)

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # the PIL plugins an image may be opened with
REMOTE_FAILED = ("the image URL could not be fetched (it must be a public http(s) address that "
                 "answers 200 with the image, without a redirect, in time); send the image as a "
                 "data URL (data:image/png;base64,...) instead")


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
        return await _remote(url, settings, param)
    if scheme in ("", "file"):
        return _local(url, settings, param)
    raise bad_request(f"image URL scheme {scheme[:20]!r} is not supported; use a data URL "
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


# Remote images ----------------------------------------------------------------------------------
def is_public_address(address: str) -> bool:
    """Whether ``address`` (an IPv4 or IPv6 literal) is a public unicast address: not loopback,
    private, link-local, shared (100.64/10), multicast, reserved or unspecified, and no such
    IPv4 address inside an IPv6 one (mapped, 6to4, Teredo, NAT64 64:ff9b::/96)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # a scope id (fe80::1%eth0) is dropped
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None]
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if any(e is not None and not is_public_address(str(e)) for e in embedded):
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback
                                 or ip.is_link_local or ip.is_private or ip.is_unspecified)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class _Refused(Exception):
    """The URL names a host this server must not reach (or cannot name one)."""


async def _remote(url: str, settings: ServerSettings, param: str) -> bytes:
    try:
        return await asyncio.wait_for(_fetch(url, settings, param),
                                      settings.remote_media_timeout_s)
    except ApiError as error:
        if error.status == 413:
            raise
        reason = error.message
    except Exception as exc:  # every failure alike for the client (module docstring)
        reason = type(exc).__name__
    logger.warning("remote image %s not fetched: %s", url[:200], reason)
    raise bad_request(REMOTE_FAILED, param, "remote_media_error") from None


async def _fetch(url: str, settings: ServerSettings, param: str) -> bytes:
    import httpx

    target = httpx.URL(url)
    host = target.host
    if not host or target.scheme not in ("http", "https"):
        raise _Refused("no host")
    port = target.port or (443 if target.scheme == "https" else 80)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(info[4][0].split("%", 1)[0] for info in infos))
    if not addresses:
        raise _Refused("no address")
    if not settings.allow_private_media_hosts and not all(map(is_public_address, addresses)):
        raise _Refused(f"{host} resolves to a non-public address")
    # Connect to the addresses checked above (in the resolver's order, the next one if a
    # connection fails), never to a second DNS answer; the Host header and the TLS server name
    # (the certificate check included) stay the URL's own.
    headers = {"Host": target.netloc.decode("ascii")}
    extensions = {"sni_hostname": host} if target.scheme == "https" else {}
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                 timeout=settings.remote_media_timeout_s) as client:
        for address in addresses:
            try:
                async with client.stream("GET", target.copy_with(host=address), headers=headers,
                                         extensions=extensions) as response:
                    return await _body(response, settings.max_image_bytes, param)
            except httpx.ConnectError:
                continue
    raise _Refused("no address accepted a connection")


async def _body(response: Any, limit: int, param: str) -> bytes:
    if response.status_code != 200:
        raise _Refused(f"HTTP {response.status_code}")
    chunks, total = [], 0
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > limit:
            raise too_large(f"remote image is larger than the limit of {limit} bytes", param)
        chunks.append(chunk)
    return b"".join(chunks)


# Decoding ---------------------------------------------------------------------------------------
def decode_image(raw: bytes, settings: ServerSettings, param: str,
                 image_processor: Any = None) -> Image.Image:
    """Decode ``raw`` to RGB within the limits (module docstring); ``image_processor`` is the
    model's, whose resize is computed (not run) to bound the size it would produce."""
    limit = settings.max_image_pixels
    try:  # reads the header only
        image = Image.open(io.BytesIO(raw), formats=FORMATS)
    except Image.DecompressionBombError:  # PIL's own bound (far above any sane limit)
        raise too_large(f"image has more pixels than the limit of {limit}; resize it first",
                        param) from None
    except Exception:  # PIL raises many types for garbage; all mean "not an accepted image"
        raise bad_request("image data is not an image in an accepted format (PNG, JPEG, WebP, "
                          "GIF, BMP); convert it to PNG or JPEG", param, "invalid_image") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise bad_request(f"image is empty ({width}x{height} pixels)", param, "invalid_image")
    if width * height > limit:
        raise too_large(f"image is {width}x{height} pixels, more than the limit of {limit}; "
                        "resize it first", param)
    ratio = max(width, height) / min(width, height)
    if ratio > settings.max_image_aspect_ratio:
        raise too_large(f"image is {width}x{height} pixels, an aspect ratio of {ratio:.4g}, more "
                        f"than the limit of {settings.max_image_aspect_ratio:g}; crop or pad it "
                        "closer to square", param)
    new_width, new_height = processed_size(image_processor, width, height)
    if new_width * new_height > limit:
        raise too_large(f"the model's processor would resize this {width}x{height} image to "
                        f"{new_width}x{new_height} pixels, more than the limit of {limit}; crop "
                        "or pad it closer to square", param)
    try:
        image.seek(0)  # GIF and WebP: the first frame
        image.load()
        return image.convert("RGB")
    except Exception as exc:
        logger.info("image not decoded (%s)", type(exc).__name__)
        raise bad_request("image data could not be decoded; the file may be truncated or "
                          "corrupt", param, "invalid_image") from None
    finally:
        image.close()


def processed_size(image_processor: Any, width: int, height: int) -> tuple[int, int]:
    """The (width, height) the model's image processor resizes a ``width`` x ``height`` image to,
    computed from its settings without resizing anything (an upper bound where the rule is
    approximate):

    - Qwen-VL (a ``merge_size``): the pixel count is brought within ``size.shortest_edge`` and
      ``size.longest_edge`` (its min and max pixels), keeping the aspect ratio;
    - a ``size.shortest_edge`` (CLIP, LLaVA): the short side becomes it (for LLaVA-NeXT, which
      resizes to one of its grid resolutions, an upper bound);
    - a ``size.height`` and ``size.width``: that size;
    - otherwise (no processor, or a rule not listed): the image's own size.
    """
    size = getattr(image_processor, "size", None)

    def field(name: str) -> int | None:
        value = size.get(name) if isinstance(size, dict) else getattr(size, name, None)
        return int(value) if isinstance(value, (int, float)) and value > 0 else None

    if size is None:
        return width, height
    shortest, longest = field("shortest_edge"), field("longest_edge")
    if hasattr(image_processor, "merge_size") and longest:
        pixels = min(max(width * height, shortest or 0), longest)
        scale = math.sqrt(pixels / (width * height))
        return max(1, round(width * scale)), max(1, round(height * scale))
    if shortest:
        scale = shortest / min(width, height)
        return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))
    if field("height") and field("width"):
        return field("width") or width, field("height") or height
    return width, height
