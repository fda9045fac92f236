"""Single-file checkpoints: written atomically, loaded strictly, self-describing.

A checkpoint is a dict saved with ``torch.save``::

    format      "rdn-sr-checkpoint"
    version     1
    config      RDNConfig as a dict (rebuilds the architecture anywhere)
    model       state_dict (BN running statistics and frozen flags included)
    step        optimizer steps completed
    bn_frozen   whether every BatchNorm is frozen into eval mode
    ...         training state (optimizer, rng, train config, best metric) when written by training
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from rdn.model import RDN, RDNConfig, batchnorm_frozen

FORMAT = "rdn-sr-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, corrupt or not from this project."""


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``.

    A crash at any moment leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            # mkstemp creates 0600; give the result the mode a plain open() would.
            os.fchmod(f.fileno(), 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (which must hold ``config`` and ``model``) atomically to ``path``."""
    missing = {"config", "model"} - payload.keys()
    if missing:
        raise ValueError(f"checkpoint payload lacks {sorted(missing)}")
    full = {"format": FORMAT, "version": VERSION, **payload}
    atomic_write(Path(path), lambda f: torch.save(full, f))


def make_payload(model: RDN, step: int = 0, **extra: Any) -> dict[str, Any]:
    """The minimal payload for ``model``: config, weights, step and BN freeze state."""
    return {
        "config": model.config.to_dict(),
        "model": model.state_dict(),
        "step": step,
        "bn_frozen": batchnorm_frozen(model),
        **extra,
    }


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint file; raise ``CheckpointError`` with the cause otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        # weights_only=False: the payload holds plain dicts, lists and numpy RNG state.
        data = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for truncated or foreign files
        cause = " ".join(str(e).split())  # some (pickle's) span lines; errors are one line
        raise CheckpointError(
            f"checkpoint {path}: cannot be read ({type(e).__name__}: {cause}); truncated or not "
            "a torch file?"
        ) from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path}: not a checkpoint of this project (expected format {FORMAT!r}; "
            "write checkpoints with rdn-train)"
        )
    if data.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path}: version {data.get('version')!r} not supported (expected {VERSION})"
        )
    for key in ("config", "model"):
        if key not in data:
            raise CheckpointError(f"checkpoint {path}: missing {key!r}")
    return data


def model_from_checkpoint(data: dict[str, Any], path: Path | str = "<checkpoint>") -> RDN:
    """Rebuild the model from the stored config and load its weights strictly."""
    try:
        config = RDNConfig(**data["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: invalid model config: {e}") from e
    model = RDN(config)
    try:
        model.load_state_dict(data["model"], strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path}: weights do not match config {config}: {first}"
        ) from e
    return model


def load_model(path: Path, map_location: str | torch.device = "cpu") -> tuple[RDN, dict[str, Any]]:
    """Load ``path`` and return (model in eval mode, checkpoint dict)."""
    data = load_checkpoint(path, map_location)
    model = model_from_checkpoint(data, path).to(map_location).eval()
    return model, data
