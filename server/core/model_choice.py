"""``model=auto``: which of a scale's two models answers an image, the clean one or the photo
one, chosen from the image itself (``server.imaging.input_kind``: its JPEG quality, noise and
8x8 blocking), and the reason the answer gives for the model that ran.

A request that names its model keeps exactly that model; a scale without a photo model keeps
its default. The two models of a scale share their architecture and tile plan, so the choice,
made once the pixels are decoded, runs within the queue capacity admitted for the clean one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.core.pipeline import Pipeline
from server.core.repository import Snapshot, named
from server.core.sizing import SizeOptions
from server.imaging.input_kind import choose, measure

NAMED_REASON = "named in the request"


@dataclass(frozen=True)
class ModelChoice:
    """The model that runs and why (the answer's ``model_reason``)."""

    pipeline: Pipeline
    reason: str


def choose_model(
    snapshot: Snapshot,
    options: SizeOptions,
    pipeline: Pipeline,
    data: bytes | bytearray | None,
    rgb: np.ndarray,
    units: int,
    turnable: bool,
    images: int = 1,
) -> ModelChoice:
    """The model for an image resolved to ``pipeline`` (its scale's default unless named):
    the scale's photo model when the measured input calls for it and the ``images`` planes of
    its tiles (2 with alpha through the model, an animation's frames) fit the ``units``
    admitted. ``data``: the encoded file (None for raw pixels). Worker thread."""
    if named(options):
        return ModelChoice(pipeline, NAMED_REASON)
    photo = snapshot.photo_for(options, pipeline)
    if photo is None:
        return ModelChoice(pipeline, f"x{pipeline.scale}: no photo model to choose from")
    choice = choose(measure(data, rgb), photo.scale)
    if choice.kind != "photo":
        return ModelChoice(pipeline, choice.reason)
    height, width = rgb.shape[:2]
    if photo.units(height, width, images, turnable=turnable) > units:
        return ModelChoice(pipeline, f"{choice.reason}; photo model's tiles over the admission")
    return ModelChoice(photo, choice.reason)
