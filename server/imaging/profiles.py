"""Embedded ICC colour profiles: parsed (an unparseable one is refused, not dropped: its
colours would silently change) and, on request, applied to convert the pixels to sRGB with
the profile's own rendering intent (littlecms2 through Pillow's ImageCms)."""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image, ImageCms

from server.imaging.headers import ImageError

log = logging.getLogger(__name__)

_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
DESCRIPTION_CHARS = 80  # a profile description is cut to this many characters
_INTENT_NAMES = {0: "perceptual", 1: "relative colorimetric", 2: "saturation", 3: "absolute"}


def parse_profile(icc: bytes, fmt: str) -> ImageCms.ImageCmsProfile:
    """The profile ``icc`` embedded in a ``fmt`` file, parsed; ImageError if it cannot be."""
    try:
        return ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except (OSError, ImageCms.PyCMSError, ValueError, TypeError) as e:
        raise ImageError(
            f"{fmt.upper()} file embeds an ICC colour profile ({len(icc)} bytes) that cannot be "
            f"parsed ({e}); re-save the image with a valid profile, or without one (sRGB is then "
            "assumed)"
        ) from e


def colour_space(profile: ImageCms.ImageCmsProfile) -> str:
    """The profile's data colour space: "RGB", "GRAY", "CMYK" ..."""
    return str(profile.profile.xcolor_space).strip()


def describe_profile(profile: ImageCms.ImageCmsProfile) -> str:
    """The profile's description ("Display P3", "sRGB IEC61966-2.1" ...) as printable ASCII of
    at most ``DESCRIPTION_CHARS`` characters (it travels in HTTP headers and logs); "unnamed"
    where the profile has none."""
    try:
        text = ImageCms.getProfileDescription(profile)
    except ImageCms.PyCMSError:
        text = ""
    ascii_text = "".join(c if " " <= c <= "~" else "?" for c in text.strip())
    return ascii_text[:DESCRIPTION_CHARS] or "unnamed"


def fits_pixels(profile: ImageCms.ImageCmsProfile, channels: int) -> bool:
    """The profile describes pixels of the answer's kind: RGB for colour, GRAY for grey (a CMYK
    file's profile does not: its pixels were converted to RGB when decoded)."""
    return colour_space(profile) == ("GRAY" if channels == 1 else "RGB")


def to_srgb(rgb: np.ndarray, profile: ImageCms.ImageCmsProfile, grey: bool) -> np.ndarray:
    """H x W x 3 uint8 pixels encoded in ``profile`` (grey: all three channels equal, a GRAY
    profile) converted to sRGB with the profile's rendering intent (the default intent where
    the profile lacks a transform for it). Returns a new H x W x 3 uint8 array."""
    if rgb.dtype != np.uint8:
        raise ImageError(
            "convert_to_srgb works on 8-bit images (the colour engine converts 8-bit samples); "
            "for this 16-bit image omit it to keep the 16 bits and the profile, or send it as 8-bit"
        )
    intent = int(profile.profile.rendering_intent)
    if not ImageCms.isIntentSupported(profile, intent, ImageCms.Direction.INPUT):
        intent = int(ImageCms.getDefaultIntent(profile))
    source = Image.fromarray(np.ascontiguousarray(rgb[:, :, 0]) if grey else rgb)
    try:
        converted = ImageCms.profileToProfile(
            source, profile, _SRGB, renderingIntent=ImageCms.Intent(intent), outputMode="RGB"
        )
    except ImageCms.PyCMSError as e:
        raise ImageError(
            f"the image's ICC profile cannot convert to sRGB ({e}); omit convert_to_srgb to keep "
            "the profile"
        ) from e
    assert converted is not None  # inPlace is False
    log.debug("converted to sRGB (%s intent)", _INTENT_NAMES.get(intent, intent))
    return np.asarray(converted)
