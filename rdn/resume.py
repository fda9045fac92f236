"""Where a training run starts, decided in one place: fresh, from ``--init``, or resumed.

``--resume`` continues ``RUN_DIR/last.pt`` and reproduces the uninterrupted run: the patches of
step k depend only on (seed, k, rank), the learning rate only on k, and the rest of the state
(weights, BN statistics and freeze flags, Adam moments, RNG states, the weight average) is in
the checkpoint. ``resume_options`` reads that checkpoint once, for the options the run
continues with; ``starting_point`` decides what the run starts from and refuses a resume that
would not reproduce the run; its ``Start.restore`` puts the optimizer, RNG and average back.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from rdn.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from rdn.distributed import Dist
from rdn.int8 import folded_state
from rdn.model import RDN, batchnorm_frozen, batchnorm_layers
from rdn.quant import configure
from rdn.train_config import TrainConfig, UsageError

log = logging.getLogger("rdn.train")

LAST = "last.pt"  # the run's checkpoint, rewritten atomically every --save-every steps

# Fields a resumed run must share with the stored run: they decide the weights it computes.
# The others (steps may grow, validation, saving, logging, workers, device) may change.
RESUME_MUST_MATCH = (
    "data",
    "scale",
    "preset",
    "norm",
    "batch_size",
    "patch_size",
    "lr",
    "lr_half_every",
    "bn_freeze_after",
    "seed",
    "channel_shuffle",
    "degradation",
    "photo_ranges",
    "schedule",
    "ema",
    "qat",
    "qat_observe_steps",
    "qat_distill",
)


# Options added after runs were already stored, with the value that reproduces those runs.
LEGACY_DEFAULTS: dict[str, Any] = {
    "channel_shuffle": False,
    "degradation": "bicubic",
    "photo_ranges": None,
}


def stored_train_config(stored: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's train_config, options it predates filled with their old behaviour."""
    return {**LEGACY_DEFAULTS, **stored}


def check_resumable(stored: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    """Refuse a resume whose settings would change the weights the run computes (a setting
    older checkpoints lack counts as its default; a cosine schedule also fixes ``steps``)."""
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    names = (*RESUME_MUST_MATCH, "steps") if cfg.schedule == "cosine" else RESUME_MUST_MATCH
    for name in names:
        was = stored.get(name, fields[name])
        if was != getattr(cfg, name):
            raise CheckpointError(
                f"checkpoint {path}: was trained with {name}={was!r}, now "
                f"{getattr(cfg, name)!r}; resume keeps these fixed - start a new --out with "
                f"--init {path} to change them"
            )


@dataclass
class RunState:
    """What changes as training runs and goes into every checkpoint besides the weights."""

    step: int = 0  # optimizer steps completed
    best_psnr: float = -math.inf
    best_step: int = -1


def rng_state() -> dict[str, Any]:
    """Every global RNG a step may draw from (Python, numpy, torch, CUDA), for last.pt."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what ``rng_state`` saved, so a resumed run draws what the original drew."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_resumable(path: Path) -> dict[str, Any]:
    """The run's ``last.pt``, checked to hold what a resume needs (loaded once per run)."""
    ckpt = load_checkpoint(path)
    for key in ("optimizer", "rng", "train_config"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path}: no {key!r}; not written by rdn-train")
    if not isinstance(ckpt["train_config"], dict):
        raise CheckpointError(f"checkpoint {path}: no train_config; not from rdn-train")
    return ckpt


def validation_identity(config: dict[str, Any]) -> tuple[Any, tuple[str, ...]]:
    """What a validation score measures: the folder and the (canonical) specs it scores, from a
    train_config dict (stored ones hold canonical specs too)."""
    specs = config.get("val_degradation") or (config.get("degradation", "bicubic"),)
    return config.get("val"), tuple(specs)


def load_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy the tensors of ``state`` whose names and shapes match ``model``'s; the rest is kept.

    The one deliberate non-strict load: fine-tuning x4 from x2 takes everything but the
    upsampler. Returns (loaded names, skipped names of the model).
    """
    own = model.state_dict()
    matching = {
        k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)
    }
    own.update(matching)
    model.load_state_dict(own, strict=True)
    return sorted(matching), sorted(set(own) - set(matching))


def qat_init_state(init: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The ``--init`` weights with BatchNorm folded: what an int8 twin starts from."""
    return folded_state(model_from_checkpoint(init, path))


def load_init(path: Path) -> dict[str, Any]:
    """The ``--init`` payload: a checkpoint, or a model rebuilt from an rdn-export ONNX file."""
    if path.suffix.lower() != ".onnx":
        return load_checkpoint(path)
    from rdn.from_onnx import OnnxImportError, checkpoint_from_onnx  # onnx only when needed

    try:
        return checkpoint_from_onnx(path)
    except OnnxImportError as e:
        raise CheckpointError(str(e)) from e


def resume_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """For ``--resume``: the options the run continues with (``options``, from flags and the
    config file, over the stored run's settings) and its ``last.pt``, loaded once."""
    out = Path(options.get("out", TrainConfig.out))
    ckpt = load_resumable(out / LAST)
    stored = ckpt["train_config"]
    # The run's own --init (a config file repeats it) is fine: the checkpoint supersedes
    # it. Another one would silently not be used, so it is refused.
    if options.get("init") is not None:
        given = str(Path(options["init"]).expanduser().resolve())
        if given != stored.get("init"):
            raise UsageError(
                f"--init {given} is not this run's --init ({stored.get('init')}); "
                f"--resume continues from {out / LAST}"
            )
    return {**stored_train_config(stored), **options}, ckpt


@dataclass
class Start:
    """What a run starts from (``starting_point`` decides): the model, its RunState and, for a
    resumed run, the checkpoint ``check_images`` and ``restore`` compare and restore."""

    model: RDN
    state: RunState
    ckpt: dict[str, Any] | None = None  # the run's last.pt when resumed
    path: Path | None = None

    @property
    def resumed(self) -> bool:
        return self.ckpt is not None

    def check_images(self, names: list[str]) -> None:
        """A resumed run must train on the images it was trained on."""
        if self.ckpt is not None and self.ckpt.get("data_images") not in (None, names):
            raise CheckpointError(
                f"checkpoint {self.path}: the training images changed "
                f"({len(self.ckpt['data_images'])} then, {len(names)} now); resume needs the "
                "same set - start a new run with --init"
            )

    def restore(
        self, optimizer: torch.optim.Optimizer, ema: AveragedModel | None, cfg: TrainConfig
    ) -> None:
        """Put back the Adam moments, the RNG states and the weight average of a resumed run."""
        if self.ckpt is None:
            return
        optimizer.load_state_dict(self.ckpt["optimizer"])
        set_rng_state(self.ckpt["rng"])
        if ema is not None:
            if "ema" not in self.ckpt:
                raise CheckpointError(
                    f"checkpoint {self.path}: ema={cfg.ema} but no average stored"
                )
            ema.load_state_dict(self.ckpt["ema"])


def starting_point(cfg: TrainConfig, ckpt: dict[str, Any] | None, ctx: Dist) -> Start:
    """The model and state a run starts from: resumed from ``ckpt`` (the run's last.pt, loaded
    by ``resume_options``) after checking it reproduces the run, else fresh (seeded) with the
    ``--init`` tensors that fit."""
    last = Path(cfg.out) / LAST
    if ckpt is None:
        if last.exists():
            raise UsageError(f"{last} exists; pass --resume to continue that run or pick --out")
        return Start(_fresh_model(cfg), RunState())
    check_resumable(stored_train_config(ckpt["train_config"]), cfg, last)
    model = model_from_checkpoint(ckpt, last)
    state = RunState(
        step=int(ckpt["step"]),
        best_psnr=float(ckpt.get("best", {}).get("val_psnr_y", -math.inf)),
        best_step=int(ckpt.get("best", {}).get("step", -1)),
    )
    was_scored_on = validation_identity(stored_train_config(ckpt["train_config"]))
    if was_scored_on != validation_identity(cfg.to_dict()) and state.best_step >= 0:
        log.warning(
            "validation changed since best.pt was chosen (%s, now %s): its %.3f dB does not "
            "compare, so the next validation replaces best.pt",
            was_scored_on,
            validation_identity(cfg.to_dict()),
            state.best_psnr,
        )
        state.best_psnr, state.best_step = -math.inf, -1
    if state.step > cfg.bn_freeze_after and not batchnorm_frozen(model):
        raise CheckpointError(
            f"checkpoint {last}: step {state.step} is past bn_freeze_after="
            f"{cfg.bn_freeze_after} but its BatchNorm is not frozen; the file is inconsistent"
        )
    if ckpt.get("world_size", 1) != ctx.world_size:
        log.warning(
            "resuming with %d processes, the run used %d: the global batch changes",
            ctx.world_size,
            ckpt.get("world_size", 1),
        )
    log.info("resuming %s at step %d of %d", last, state.step, cfg.steps)
    return Start(model, state, ckpt, last)


def distill_teacher(cfg: TrainConfig) -> RDN | None:
    """For ``--qat-distill``: the ``--init`` model as the twin is built from it, computing in
    float (``rdn.quant.float_mode``'s switches), frozen; ``None`` without the option. Built the
    same way on a fresh start and a resume, without touching the random state."""
    if not cfg.qat_distill:
        return None
    with torch.random.fork_rng():  # _fresh_model seeds every generator; keep the run's
        teacher = _fresh_model(cfg)
    configure(teacher, active=False, observe=False)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _fresh_model(cfg: TrainConfig) -> RDN:
    """A new model seeded by ``cfg.seed``, with the ``--init`` tensors of matching name and
    shape."""
    torch.manual_seed(cfg.seed)
    model = RDN(cfg.model_config())
    if cfg.init is None:
        return model
    init = load_init(Path(cfg.init))
    if cfg.qat:
        init = {**init, "model": qat_init_state(init, Path(cfg.init))}
    loaded, skipped = load_matching(model, init["model"])
    if not loaded:
        raise CheckpointError(
            f"checkpoint {cfg.init}: no tensor matches this model ({cfg.model_config()})"
        )
    log.info(
        "--init %s: loaded %d tensors, skipped %d (%s)",
        cfg.init,
        len(loaded),
        len(skipped),
        ", ".join(skipped[:6]) + (", ..." if len(skipped) > 6 else ""),
    )
    if batchnorm_layers(model) and batchnorm_frozen(model):
        log.info("BatchNorm arrives frozen from --init: no calibration phase")
    return model
