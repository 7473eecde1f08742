"""microVM guest images built from the templates in ``infra/templates`` (see builder.py)."""

from __future__ import annotations

from vmhost.images.builder import (
    ImageInfo,
    build_image,
    find_image,
    image_key,
    list_images,
)
from vmhost.settings import default_image_dir

__all__ = [
    "ImageInfo",
    "build_image",
    "default_image_dir",
    "find_image",
    "image_key",
    "list_images",
]
