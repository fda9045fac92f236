"""Where the shipped models live: ``server/models/`` (``default_x{scale}.onnx``, the clean
models, and the photo models), the repository ``rdn-serve`` serves without flags.

The files ship inside the package (``[tool.setuptools.package-data]``), so an installed
``rdn-serve`` finds them without a path; they are located beside this module.
"""

from __future__ import annotations

from pathlib import Path

from rdn.constants import SCALES

MODELS_DIR = Path(__file__).resolve().parent / "models"


def default_model_path(scale: int) -> Path:
    """The path the embedded clean model for ``scale`` has (whether or not the file exists)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale}")
    return MODELS_DIR / f"default_x{scale}.onnx"
