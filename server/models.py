"""Where the embedded default models live: ``server/models/default_x{scale}.onnx``.

The files ship inside the package (``[tool.setuptools.package-data]``), so an installed
``rdn-serve`` finds them without a path; they are located beside this module.
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
SCALES = (2, 3, 4)  # upscaling factors RDN is built for


class DefaultModelMissing(FileNotFoundError):
    """No embedded model for the requested scale (the message lists the scales that exist)."""


def default_model_path(scale: int) -> Path:
    """The path the embedded model for ``scale`` has (whether or not the file exists)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale}")
    return MODELS_DIR / f"default_x{scale}.onnx"


def available_default_scales() -> tuple[int, ...]:
    """Scales whose embedded model file is present."""
    return tuple(s for s in SCALES if default_model_path(s).is_file())


def resolve_default_model(scale: int) -> Path:
    """The embedded model for ``scale``; ``DefaultModelMissing`` says which scales exist."""
    path = default_model_path(scale)
    if path.is_file():
        return path
    available = available_default_scales()
    if not available:
        hint = "embedded models available: none; pass --model PATH.onnx"
    else:
        have = ", ".join(f"x{s}" for s in available)
        hint = f"embedded models available: {have}; pass --scale with one of those or --model"
    raise DefaultModelMissing(f"no embedded model for x{scale} ({path} is missing); {hint}")
