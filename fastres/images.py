"""Image files in: decode to uint8 RGB tensors with Pillow, and find the images in files and folders.

Pillow is optional (the `images` extra) and imported only when an image is decoded. Every image comes
out as a contiguous uint8 3 x H x W RGB tensor, whatever it was stored as: grayscale, RGBA (alpha
dropped, as torchvision's ImageFolder loader does), CMYK, palette, 16-bit. EXIF orientation is
applied, so a phone photo comes out the way it is displayed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from .errors import ImageDecodeError, InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# 16-bit grayscale modes: Pillow's own convert("RGB") would clip them at 255 (a white image)
_WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def require_pillow():
    """Pillow's Image and ImageOps modules, or an ImportError that says how to install them."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ImportError(
            "decoding images needs Pillow, which is not installed; run: pip install 'fastres[images]'"
        ) from None
    return Image, ImageOps


def _to_rgb(img):
    """A PIL image in any mode -> a PIL image in mode RGB (8 bits per channel)."""
    Image, _ = require_pillow()
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_GRAY_MODES:
        wide = np.asarray(img, dtype=np.float64)
        # 0..65535 onto 0..255 (65535 / 257 = 255 exactly), rounded like every other uint8 conversion
        gray = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode == "F":  # 32-bit float grayscale: taken to be in [0, 1]
        gray = np.clip(np.rint(np.asarray(img, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency is only well defined through RGBA
    return img.convert("RGB")


def pil_to_tensor(img) -> torch.Tensor:
    """A PIL image (any mode, EXIF orientation applied) -> uint8 3 x H x W RGB, contiguous."""
    _, ImageOps = require_pillow()
    img = _to_rgb(ImageOps.exif_transpose(img))
    # H x W x 3 -> 3 x H x W in one numpy copy: several times faster than torch's permute().contiguous()
    # on uint8, and a writable array torch can own
    return torch.from_numpy(np.array(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1), order="C"))


# Far above any camera's (a 48 MP phone, a 100 MP medium-format back), far below what a small file can
# claim: a 160 KB single-colour PNG can say 13000 x 13000, which Pillow (limit 179 MP) would decode
# into gigabytes. Checked from the header, before decoding.
DEFAULT_MAX_PIXELS = 120_000_000


def decode_image(
    source: bytes | str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Decode an image file (path) or its encoded bytes to a uint8 3 x H x W RGB tensor on the CPU.

    An image whose header claims more than `max_pixels` pixels is refused before it is decoded
    (InputError); None lifts the limit (Pillow's own bomb check still applies).

    Raises ImageDecodeError (an InputError, so a ValueError) naming the file when Pillow cannot read
    it, FileNotFoundError when the path does not exist, and ImportError when Pillow is missing.
    """
    Image, _ = require_pillow()
    if isinstance(source, (bytes, bytearray, memoryview)):
        what, stream = f"<{len(source)} bytes of image data>", io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        what, stream = os.fspath(source), os.fspath(source)
        if not os.path.exists(what):
            raise FileNotFoundError(f"image not found: {what}")
        if os.path.isdir(what):
            raise InputError(f"{what} is a folder, not an image; use find_images() to list its images")
        if os.path.getsize(what) == 0:
            raise ImageDecodeError(f"cannot decode {what}: the file is empty (0 bytes)")
    else:
        raise TypeError(f"decode_image takes a path or encoded bytes, got {type(source).__name__}")
    try:
        with Image.open(stream) as img:  # reads the header only
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise InputError(
                    f"{what} is {img.width}x{img.height} ({img.width * img.height} pixels), over the "
                    f"limit of {max_pixels} pixels; resize it first"
                )
            img.load()  # decode now: a truncated file fails here, not later in a worker
            return pil_to_tensor(img)
    except InputError:  # the size limit: already says what to do
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # Pillow reports unreadable data as UnidentifiedImageError (an OSError), truncation as OSError,
        # some corrupt headers as SyntaxError or ValueError
        if isinstance(exc, Image.UnidentifiedImageError):
            reason = "not a format Pillow recognises (JPEG, PNG, WebP, BMP, ...)"
        else:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImageDecodeError(f"cannot decode {what} as an image: {reason}") from None


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def find_images(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The image files among `paths`, in the order given; each folder searched recursively, sorted.

    In folders, files count as images by extension (case-insensitive: .jpg .jpeg .png .webp .bmp);
    hidden files and folders (a leading '.', e.g. macOS '._photo.jpg') are skipped. A file named
    explicitly is taken as given, whatever its extension. Duplicates are listed once.
    Raises InputError for a path that does not exist and when no image is found at all.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("no image paths given; pass image files or folders")
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise InputError(f"no such file or folder: {path}")
        if path.is_dir():
            in_folder = []
            for root, dirs, files in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                in_folder += [Path(root, f) for f in files if not f.startswith(".") and _is_image_name(f)]
            found += sorted(in_folder)
        else:
            found.append(path)
    unique = list(dict.fromkeys(found))
    if not unique:
        where = ", ".join(map(str, paths))
        raise InputError(
            f"no images found in {where} (looked for {', '.join(IMAGE_EXTENSIONS)} files, case-insensitive)"
        )
    return unique
