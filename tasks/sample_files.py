"""The user's image files (``leap explain IMAGES``, ``leap audit --samples DIR``), checked and hashed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from leapcore.errors import InputError
from tasks.stages import SampleFile

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

__all__ = ["IMAGE_SUFFIXES", "image_files"]


def image_files(images: list[str] | str) -> list[SampleFile]:
    """The image files named by ``images`` (files, or folders whose images are taken in name order),
    each with the SHA-256 of its bytes.

    Raises:
        InputError: a path that does not exist, a file that is not an image, or no images at all.
    """
    items = [images] if isinstance(images, (str, Path)) else list(images or [])
    paths: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(
                    f"folder {str(path)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})."
                )
            paths.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise InputError(
                    f"{str(path)!r} is not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})."
                )
            paths.append(path)
        else:
            raise InputError(f"no such image file or folder: {str(path)!r}.")
    if not paths:
        raise InputError("give at least one image file or a folder of images.")
    return [SampleFile(str(p.resolve()), hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths]
