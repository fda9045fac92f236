"""What a request asks to be done with an image file's colour, metadata and alpha, beyond its
size: one frozen value that every door (rdn.v1 gRPC, HTTP), the client and the local API fill
in the same way and the codec reads."""

from __future__ import annotations

from dataclasses import dataclass

from server.imaging.headers import ImageError

ALPHA_MODES = ("model", "bicubic")  # how an alpha channel is upscaled
DEFAULT_ALPHA = "model"  # measured better on soft edges: docs/serving.md, "Transparency"


@dataclass(frozen=True)
class ImageOptions:
    """Per-request handling of what an image file carries besides its pixels.

    ``convert_to_srgb``: convert the pixels from their embedded ICC profile to sRGB (with the
    profile's rendering intent) and write no profile; otherwise the profile is carried into the
    answer and the pixels stay in its encoding. ``strip_metadata``: drop EXIF and XMP (GPS and
    camera data) instead of carrying them. ``alpha``: "model" upscales an alpha channel with
    the model (as a grey image), "bicubic" with a bicubic filter.
    """

    convert_to_srgb: bool = False
    strip_metadata: bool = False
    alpha: str = DEFAULT_ALPHA


DEFAULT_OPTIONS = ImageOptions()


def alpha_mode(name: str) -> str:
    """``name`` checked as an alpha mode ("" is the default); ImageError names the choices."""
    mode = (name or DEFAULT_ALPHA).lower()
    if mode not in ALPHA_MODES:
        raise ImageError(
            f"alpha mode {name!r} is not known; choose one of {', '.join(ALPHA_MODES)}"
        )
    return mode
