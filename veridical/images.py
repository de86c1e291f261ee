"""Image input: PIL images or paths in, RGB PIL images out, or a clear ``InputError``.

Accepts a ``PIL.Image.Image``, a path (``str`` or ``os.PathLike``) or raw bytes. Paths that do not
exist, files that are not images, truncated files and decompression bombs are refused with a
message naming the file and the fix; nothing from inside PIL leaks out.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from .errors import InputError

MAX_PIXELS = 64_000_000  # larger images are refused (decompression-bomb guard)


def load_image(source: Any, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Return ``source`` as a fully decoded RGB image."""
    if isinstance(source, Image.Image):
        image, name = source, "the given PIL image"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = f"image file {str(path)!r}"
        if not path.is_file():
            raise InputError(f"{name} does not exist; pass the path of an existing image file")
        image = _open(path, name, max_pixels)
    elif isinstance(source, (bytes, bytearray)):
        name = "the given image bytes"
        image = _open(io.BytesIO(source), name, max_pixels)
    else:
        raise InputError(
            f"image must be a PIL.Image, a file path or bytes, got {type(source).__name__}"
        )
    if image.width * image.height > max_pixels:
        raise InputError(
            f"{name} has {image.width}x{image.height} pixels, more than the limit of {max_pixels}; "
            "resize it first"
        )
    if image.width == 0 or image.height == 0:
        raise InputError(f"{name} is empty (size {image.width}x{image.height})")
    return image.convert("RGB") if image.mode != "RGB" else image


def _open(fp: Any, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fp)
            if image.width * image.height > max_pixels:
                raise InputError(
                    f"{name} has {image.width}x{image.height} pixels, more than the limit of "
                    f"{max_pixels}; resize it first"
                )
            image.load()
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{name} is not an image PIL can read (PNG, JPEG, ...)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise InputError(f"{name} could not be decoded ({exc}); the file may be truncated") from None
    return image
