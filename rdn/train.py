"""Train RDN: L1 loss, Adam, step-decayed learning rate, BatchNorm frozen after calibration.

``rdn-train --preset tiny --scale 2 --steps 300 --out runs/tiny`` trains on the photographs
scikit-image ships; ``--data DIR`` trains on a folder of HR images. Under
``torchrun --nproc_per_node N`` training is DistributedDataParallel and every rank draws its
own patches. ``RUN_DIR/last.pt`` is rewritten atomically every ``--save-every`` steps and
``--resume`` continues from it, reproducing the uninterrupted run: the patches of step k
depend only on (seed, k, rank), the learning rate only on k, and the rest of the state
(weights, BN statistics and freeze flags, Adam moments, RNG states) is in the checkpoint.

Defaults are the paper's recipe (L1, Adam 0.9/0.999/1e-8, batch 16, 48x48 LR patches, lr
1e-4 halved every 200 epochs of 1000 iterations) with three departures, each measured: a larger
learning rate for the small presets (``DEFAULT_LR``), a schedule and BN freeze that scale with
``--steps``, and RGB channel permutation of the patches. docs/training.md ("Training: why these
defaults") tells what was measured. The recipe, top to bottom: ``main`` reads the options (and
the run's ``last.pt``, once, for ``--resume``), ``run`` builds the model (fresh, ``--init`` or
resumed), data and optimizer, ``train_loop`` trains, validates and checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import random
import sys
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from rdn.checkpoint import (
    CheckpointError,
    load_checkpoint,
    make_payload,
    model_from_checkpoint,
    save_checkpoint,
)
from rdn.data import DEFAULT_CACHE_BYTES, DataError, PatchDataset, StepBatchSampler, build_dataset
from rdn.degradations import Degradation, DegradationError, PhotoRanges, parse_degradation
from rdn.distributed import (
    DeviceError,
    Dist,
    cpu_count,
    destroy_process_group,
    dist_from_env,
    init_process_group,
    pick_device,
    same_weights_on_all_ranks,
    threads_per_rank,
)
from rdn.imaging import ImageReadError, list_images
from rdn.int8 import QAT_MOMENTUM, calibrate, folded_state
from rdn.model import (
    NORMS,
    PRESETS,
    RDN,
    SCALES,
    RDNConfig,
    batchnorm_frozen,
    batchnorm_layers,
    freeze_batchnorm,
)
from rdn.progress import Progress, append_metrics
from rdn.quant import configure

log = logging.getLogger("rdn.train")

# Base learning rate per preset: the paper's 1e-4 for the large presets, more for the small ones
# (docs/training.md, "Training: why these defaults").
DEFAULT_LR: dict[str, float] = {"paper": 1e-4, "medium": 1e-4, "small": 2e-3, "tiny": 4e-3}
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
QAT_CALIBRATION = 16  # training batches whose activation extremes start a --qat run
LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.jsonl"

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
)
SCHEDULES = ("step", "cosine")


class UsageError(ValueError):
    """A bad command line or config value (exit status 2)."""


@dataclass(frozen=True)
class TrainConfig:
    """Every training hyperparameter; stored in each checkpoint as ``train_config``."""

    data: str | None = None  # folder of HR images; None: scikit-image's photographs
    val: str | None = None  # folder of HR images for PSNR/SSIM; None: best.pt = final weights
    scale: int = 2
    preset: str = "paper"
    norm: str = "batch"
    steps: int = 600_000  # three stages of the paper's 200k-iteration learning-rate halving
    batch_size: int = 16  # per process; the global batch is batch_size x world size
    patch_size: int = 48  # LR patch side; the HR patch is scale times larger
    lr: float = 1e-4  # resolved from DEFAULT_LR[preset] unless given
    lr_half_every: int = 200_000  # resolved to steps // 3 unless given; 0: constant
    schedule: str = "step"  # step: halved every lr_half_every; cosine: to 0 at the last step
    ema: float = 0.0  # decay of an exponential moving average of the weights; 0: none
    bn_freeze_after: int = 300_000  # resolved to steps // 2 unless given
    val_every: int = 1000
    save_every: int = 1000
    log_every: int = 100
    seed: int = 0
    device: str = "auto"
    workers: int = -1  # DataLoader workers; -1: 0 when every image is cached, else up to 4
    cache_mb: int = DEFAULT_CACHE_BYTES // 2**20
    skip_bad_images: bool = False
    channel_shuffle: bool = True  # permute RGB channels per sample (module docstring: why)
    init: str | None = None  # checkpoint (or rdn-export ONNX file) initialising the model
    degradation: str = "bicubic"  # LR made from HR by this spec (rdn.degradations)
    # Validation scores the mean PSNR over these specs (fixed seed 0) and best.pt follows that
    # mean; empty: the training degradation alone.
    val_degradation: tuple[str, ...] = ()
    photo_ranges: dict[str, Any] | None = None  # the photo chain's ranges; None: PhotoRanges()
    # Quantization-aware fine-tuning of an int8 twin (rdn.quant): needs --init; activation
    # ranges are calibrated on the first batches, then follow the data until qat_observe_steps.
    qat: bool = False
    qat_observe_steps: int = 0  # resolved to steps // 2 unless given
    out: str = "runs/rdn"

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise UsageError(what)

        for name in ("steps", "batch_size", "patch_size", "val_every", "save_every", "log_every"):
            value = getattr(self, name)
            need(_is_int(value) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        for name in ("lr_half_every", "bn_freeze_after", "seed", "cache_mb", "qat_observe_steps"):
            value = getattr(self, name)
            need(_is_int(value) and value >= 0, f"{name} must be an integer >= 0, got {value!r}")
        need(_is_int(self.workers) and self.workers >= -1, f"workers must be >= -1: {self.workers}")
        need(self.scale in SCALES, f"scale must be one of {SCALES}, got {self.scale!r}")
        need(self.preset in PRESETS, f"preset must be one of {sorted(PRESETS)}: {self.preset!r}")
        need(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
        need(
            self.device in ("auto", "cpu", "cuda"), f"device must be auto|cpu|cuda: {self.device!r}"
        )
        need(
            isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0,
            f"lr must be a positive number, got {self.lr!r}",
        )
        need(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}: {self.schedule!r}")
        need(
            isinstance(self.ema, int | float) and 0 <= self.ema < 1,
            f"ema must be a decay in [0, 1), e.g. 0.999 (0: off), got {self.ema!r}",
        )
        need(not self.qat or self.init is not None, "--qat fine-tunes a trained model: give --init")
        for name in ("skip_bad_images", "channel_shuffle", "qat"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false")
        need(isinstance(self.degradation, str), f"degradation must be a spec: {self.degradation!r}")
        need(
            isinstance(self.val_degradation, tuple)
            and all(isinstance(spec, str) for spec in self.val_degradation),
            f"val_degradation must be a list of specs, got {self.val_degradation!r}",
        )
        need(
            len(set(self.val_degradation)) == len(self.val_degradation),
            f"val_degradation names a spec twice: {list(self.val_degradation)}",
        )
        need(
            not self.val_degradation or self.val is not None,
            "val_degradation needs a --val folder of images to score",
        )
        need(
            self.photo_ranges is None or isinstance(self.photo_ranges, dict),
            f"photo_ranges must be a table, got {self.photo_ranges!r}",
        )
        try:
            self.degradation_spec()
            self.val_degradation_specs()
        except DegradationError as e:
            raise UsageError(str(e)) from e

    def degradation_spec(self) -> Degradation:
        return parse_degradation(self.degradation, PhotoRanges.from_dict(self.photo_ranges or {}))

    def val_degradation_specs(self) -> tuple[Degradation, ...]:
        """What validation scores: ``val_degradation`` (``photo`` drawn from this run's
        ranges), else the training degradation."""
        ranges = PhotoRanges.from_dict(self.photo_ranges or {})
        specs = self.val_degradation or (self.degradation,)
        return tuple(parse_degradation(spec, ranges) for spec in specs)

    def model_config(self) -> RDNConfig:
        if self.qat:  # BatchNorm folded into the convs: the int8 graph has none
            return RDNConfig.from_preset(self.preset, scale=self.scale, norm="none", quant="int8")
        return RDNConfig.from_preset(self.preset, scale=self.scale, norm=self.norm)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
PATH_FIELDS = ("data", "val", "init", "out")


def make_train_config(options: dict[str, Any]) -> TrainConfig:
    """TrainConfig from explicit options; lr, lr_half_every and bn_freeze_after not given
    are derived from the preset and the number of steps."""
    unknown = set(options) - FIELDS
    if unknown:
        raise UsageError(f"unknown option(s) {sorted(unknown)}; valid: {sorted(FIELDS)}")
    options = {"out": TrainConfig.out, **options}
    for name in PATH_FIELDS:
        if options.get(name) is not None:
            if not isinstance(options[name], str | Path):
                raise UsageError(f"{name} must be a path, got {options[name]!r}")
            options[name] = str(Path(options[name]).expanduser().resolve())
    if isinstance(options.get("photo_ranges"), dict):  # one canonical form, compared on resume
        try:
            options["photo_ranges"] = PhotoRanges.from_dict(options["photo_ranges"]).to_dict()
        except DegradationError as e:
            raise UsageError(str(e)) from e
    try:
        if isinstance(options.get("degradation"), str):
            options["degradation"] = parse_degradation(options["degradation"]).spec
        # TOML and flags give lists, a resumed run's stored config a tuple
        if isinstance(options.get("val_degradation"), list | tuple):
            options["val_degradation"] = tuple(
                parse_degradation(spec).spec if isinstance(spec, str) else spec
                for spec in options["val_degradation"]
            )
    except DegradationError as e:
        raise UsageError(str(e)) from e
    preset = options.get("preset", TrainConfig.preset)
    if "lr" not in options and preset in DEFAULT_LR:
        options["lr"] = DEFAULT_LR[preset]
    steps = options.get("steps", TrainConfig.steps)
    if "bn_freeze_after" not in options:
        options["bn_freeze_after"] = default_bn_freeze_after(steps) if _is_int(steps) else 0
    if "lr_half_every" not in options:
        options["lr_half_every"] = default_lr_half_every(steps) if _is_int(steps) else 0
    if "qat_observe_steps" not in options and options.get("qat"):
        options["qat_observe_steps"] = steps // 2 if _is_int(steps) else 0
    try:
        return TrainConfig(**options)
    except TypeError as e:
        raise UsageError(str(e)) from e


def default_bn_freeze_after(steps: int) -> int:
    """Train with batch statistics for the first half of the run, then freeze (docs/training.md,
    "Training: why these defaults")."""
    return steps // 2


def default_lr_half_every(steps: int) -> int:
    """Halve the learning rate at a third and two thirds of the run (with the default 600k
    steps: the paper's halving every 200 epochs of 1000 iterations)."""
    return max(1, steps // 3)


def lr_at(
    step: int, base_lr: float, half_every: int, schedule: str = "step", steps: int = 0
) -> float:
    """Learning rate of step ``step`` (0-based): with ``step``, halved every ``half_every``
    steps (0: never); with ``cosine``, from ``base_lr`` down to 0 at step ``steps``."""
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))
    if half_every <= 0:
        return base_lr
    return base_lr * 0.5 ** (step // half_every)


def read_toml_config(path: Path) -> dict[str, Any]:
    """Options from a TOML file whose keys are flag names (``batch-size`` or ``batch_size``).

    Relative paths in the file are taken relative to the file's folder.
    """
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError as e:
        raise UsageError(f"config {path}: no such file") from e
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config {path}: invalid TOML ({e})") from e
    options = {key.replace("-", "_"): value for key, value in raw.items()}
    unknown = set(options) - FIELDS
    if unknown:
        raise UsageError(f"config {path}: unknown key(s) {sorted(unknown)}")
    for name in PATH_FIELDS:  # relative paths in the file are relative to the file
        if isinstance(options.get(name), str):
            options[name] = str(Path(path).parent / Path(options[name]).expanduser())
    return options


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """Flags default to 'not given' so a TOML config and a resumed run's settings can fill them."""
    p = _Parser(
        prog="rdn-train",
        description="Train RDN super-resolution. Precedence: flags > --config TOML > "
        "the resumed run's settings > defaults.",
        argument_default=argparse.SUPPRESS,
    )
    d = TrainConfig()
    p.add_argument("--config", type=Path, help="TOML file of options (keys are flag names)")
    p.add_argument("--data", help="folder of HR training images (default: scikit-image photos)")
    p.add_argument("--val", help="folder of HR validation images (default: none; best.pt = last)")
    p.add_argument("--scale", type=int, choices=SCALES, help=f"default {d.scale}")
    p.add_argument("--preset", choices=sorted(PRESETS), help=f"default {d.preset}")
    p.add_argument("--norm", choices=NORMS, help=f"default {d.norm}")
    p.add_argument("--steps", type=int, help=f"optimizer steps in all (default {d.steps})")
    p.add_argument("--batch-size", type=int, help=f"per process (default {d.batch_size})")
    p.add_argument("--patch-size", type=int, help=f"LR patch side (default {d.patch_size})")
    p.add_argument("--lr", type=float, help=f"base learning rate (default per preset {DEFAULT_LR})")
    p.add_argument("--lr-half-every", type=int, help="default steps/3; 0: never")
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help="step: halve every --lr-half-every (default); cosine: decay to 0 at --steps",
    )
    p.add_argument(
        "--ema",
        type=float,
        help="keep an exponential moving average of the weights with this decay (e.g. 0.999): "
        "validation, best.pt and so rdn-export use it (default 0: off)",
    )
    p.add_argument(
        "--bn-freeze-after",
        type=int,
        help="freeze BatchNorm into eval mode after this many steps (default steps/2)",
    )
    p.add_argument("--val-every", type=int, help=f"default {d.val_every}")
    p.add_argument("--save-every", type=int, help=f"default {d.save_every}")
    p.add_argument("--log-every", type=int, help=f"default {d.log_every}")
    p.add_argument("--seed", type=int, help=f"default {d.seed}")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help=f"default {d.device}")
    p.add_argument("--workers", type=int, help="DataLoader workers (default: automatic)")
    p.add_argument("--cache-mb", type=int, help=f"decoded-image cache (default {d.cache_mb})")
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip unreadable or too-small images with a warning instead of failing",
    )
    p.add_argument(
        "--channel-shuffle",
        action=argparse.BooleanOptionalAction,
        help="permute the RGB channels of each patch, one of 6 orders (default on; "
        "--no-channel-shuffle follows the paper)",
    )
    p.add_argument(
        "--init",
        help="checkpoint whose tensors of matching name and shape are loaded, or an ONNX file "
        "written by rdn-export (e.g. server/models/default_x2.onnx)",
    )
    p.add_argument(
        "--degradation",
        help="how LR patches are made from HR: bicubic (default), bd, dn, jpeg:Q[-Q2], "
        "noise:S[-S2] or photo (ranges in the config's [photo_ranges] table)",
    )
    p.add_argument(
        "--val-degradation",
        action="append",
        metavar="SPEC",
        help="validate on this degradation of the --val images (repeatable: best.pt follows the "
        "mean PSNR over all given; default: the training --degradation)",
    )
    p.add_argument(
        "--qat",
        action="store_true",
        help="quantization-aware fine-tuning of the --init model's int8 twin (BatchNorm folded; "
        "export with rdn-export --int8)",
    )
    p.add_argument(
        "--qat-observe-steps",
        type=int,
        help="with --qat: activation ranges follow the data until this step, then stay "
        "(default steps/2)",
    )
    p.add_argument("--out", help=f"run directory (default {d.out})")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    return p


# ----------------------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


# ----------------------------------------------------------------------------- training


@dataclass
class RunState:
    """What changes as training runs and goes into every checkpoint besides the weights."""

    step: int = 0  # optimizer steps completed
    best_psnr: float = -math.inf
    best_step: int = -1


def train_one_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_images: torch.Tensor,
    hr_images: torch.Tensor,
) -> torch.Tensor:
    """One optimizer step on one batch; returns the detached loss (no device sync)."""
    loss = criterion(model(lr_images), hr_images)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def validate(
    model: nn.Module,
    folder: Path,
    scale: int,
    device: torch.device,
    degradations: Sequence[Degradation],
) -> dict[str, Any]:
    """Mean PSNR/SSIM (Y channel) on ``folder``: rdn-eval's protocol and its seed 0 for each
    degradation, so the numbers compare with ``rdn-eval --degradation`` (which draws ``photo``
    from the default ranges; a run with its own ``[photo_ranges]`` validates on those).

    ``val_psnr_y`` and ``val_ssim_y`` are the means over ``degradations``; with more than one,
    ``val_by_degradation`` holds each one's PSNR.
    """
    # Imported here: onnxruntime and scipy cost ~0.7 s of start-up, wasted without --val.
    from rdn.evaluate import EvalError, evaluate_model

    psnr: dict[str, float] = {}
    ssim: list[float] = []
    for degradation in degradations:
        try:
            result = evaluate_model(
                model, folder, scale, device=device, degradation=degradation
            ).summary()
        except EvalError as e:
            raise DataError(f"validation: {e}") from e
        psnr[degradation.spec] = float(result["model_psnr_y"])
        ssim.append(float(result["model_ssim_y"]))
    scores: dict[str, Any] = {
        "val_psnr_y": sum(psnr.values()) / len(psnr),
        "val_ssim_y": sum(ssim) / len(ssim),
    }
    if len(psnr) > 1:
        scores["val_by_degradation"] = psnr
    return scores


def train_loop(
    model: nn.Module,
    raw_model: RDN,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    cfg: TrainConfig,
    state: RunState,
    ctx: Dist,
    extra_payload: dict[str, Any],
    ema: AveragedModel | None = None,
) -> RunState:
    """Train from ``state.step`` to ``cfg.steps``: freeze BN, log, validate, checkpoint.

    ``model`` is what the forward pass runs (DDP-wrapped or not), ``raw_model`` the RDN
    inside it (for freezing, validation and checkpoints). With ``ema``, the moving average
    is updated after every step and is what validation scores and best.pt holds; last.pt
    holds both. Only rank 0 writes files.
    """
    out = Path(cfg.out)
    criterion = nn.L1Loss()
    metrics = out / METRICS if ctx.is_main else None
    progress = Progress(metrics, state.step, cfg.steps, cfg.log_every, ctx, device)
    has_bn = bool(batchnorm_layers(raw_model))

    scored = raw_model if ema is None else ema.module  # what validation and best.pt use
    val_specs = cfg.val_degradation_specs()

    def payload(weights: RDN = raw_model) -> dict[str, Any]:
        return make_payload(
            weights,
            step=state.step,
            optimizer=optimizer.state_dict(),
            schedule={
                "kind": cfg.schedule,
                "base_lr": cfg.lr,
                "half_every": cfg.lr_half_every,
                "ema": cfg.ema,
            },
            rng=rng_state(),
            train_config=cfg.to_dict(),
            best={"val_psnr_y": state.best_psnr, "step": state.best_step},
            world_size=ctx.world_size,
            **({} if ema is None else {"ema": ema.state_dict()}),
            **extra_payload,
        )

    model.train()
    with progress.logging_context():
        for step, (lr_images, hr_images) in enumerate(loader, start=state.step):
            if has_bn and step == cfg.bn_freeze_after:
                n = freeze_batchnorm(raw_model)
                if ema is not None:
                    freeze_batchnorm(ema.module)
                log.info("step %d: froze %d BatchNorm layers into eval mode", step, n)
            if cfg.qat:
                observing = step < cfg.qat_observe_steps
                configure(raw_model, active=True, observe=observing, momentum=QAT_MOMENTUM)
            lr = lr_at(step, cfg.lr, cfg.lr_half_every, cfg.schedule, cfg.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            lr_images = lr_images.to(device, non_blocking=True)
            hr_images = hr_images.to(device, non_blocking=True)
            loss = train_one_step(model, criterion, optimizer, lr_images, hr_images)
            if ema is not None:
                ema.update_parameters(raw_model)
            state.step = done = step + 1
            progress.step_done(done, loss, lr)
            if not ctx.is_main:
                continue
            if cfg.val is not None and (done % cfg.val_every == 0 or done == cfg.steps):
                log.info(
                    "step %d: validating on %s (x%d, LR %s, whole images)...",
                    done,
                    cfg.val,
                    cfg.scale,
                    ", ".join(spec.spec for spec in val_specs),
                )
                started = time.perf_counter()
                if cfg.qat:  # validation images must not move the activation ranges
                    configure(raw_model, active=True, observe=False)
                result = validate(scored, Path(cfg.val), cfg.scale, device, val_specs)
                progress.write({"step": done, **result})
                log.info(
                    "step %d: validation PSNR %.3f dB%s SSIM %.4f in %.1f s (best before: "
                    "%.3f at step %d)",
                    done,
                    result["val_psnr_y"],
                    describe_by_degradation(result.get("val_by_degradation", {})),
                    result["val_ssim_y"],
                    time.perf_counter() - started,
                    state.best_psnr,
                    state.best_step,
                )
                if result["val_psnr_y"] > state.best_psnr:
                    state.best_psnr, state.best_step = result["val_psnr_y"], done
                    save_checkpoint(out / BEST, payload(scored))
            if done % cfg.save_every == 0 or done == cfg.steps:
                save_checkpoint(out / LAST, payload())
                if cfg.val is None and ema is not None:  # no validation: best = the average
                    save_checkpoint(out / BEST, payload(scored))
    progress.close()
    return state


def validation_identity(config: dict[str, Any]) -> tuple[Any, tuple[str, ...]]:
    """What a validation score measures: the folder and the (canonical) specs it scores, from a
    train_config dict (stored ones hold canonical specs too)."""
    specs = config.get("val_degradation") or (config.get("degradation", "bicubic"),)
    return config.get("val"), tuple(specs)


def describe_by_degradation(psnr: dict[str, float]) -> str:
    """`` (mean of bicubic 36.100, jpeg:50 31.200)`` for a log line; empty for one spec."""
    if not psnr:
        return ""
    return " (mean of " + ", ".join(f"{spec} {value:.3f}" for spec, value in psnr.items()) + ")"


def ema_decay(decay: float, updates: int) -> float:
    """The decay of the update after ``updates`` others: ``decay``, warmed up as
    (1 + n) / (10 + n) so the average does not start dominated by the initial weights
    (0.999 ** 500 = 0.61: a short run's plain average scored 17 dB where its weights scored
    32.8 at step 500)."""
    return min(decay, (1 + updates) / (10 + updates))


def make_ema(model: RDN, decay: float) -> AveragedModel | None:
    """torch's averaged copy of ``model`` (weights and buffers), updated after every optimizer
    step with ``ema_decay``; None for decay 0."""
    if decay <= 0:
        return None

    def average(
        averaged: torch.Tensor, current: torch.Tensor, updates: torch.Tensor
    ) -> torch.Tensor:
        kept = ema_decay(decay, int(updates))
        return kept * averaged + (1 - kept) * current

    ema = AveragedModel(model, avg_fn=average, use_buffers=True)
    if batchnorm_frozen(model):
        freeze_batchnorm(ema.module)
    return ema


def load_resumable(path: Path) -> dict[str, Any]:
    """The run's ``last.pt``, checked to hold what a resume needs (loaded once per run)."""
    ckpt = load_checkpoint(path)
    for key in ("optimizer", "rng", "train_config"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path}: no {key!r}; not written by rdn-train")
    if not isinstance(ckpt["train_config"], dict):
        raise CheckpointError(f"checkpoint {path}: no train_config; not from rdn-train")
    return ckpt


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


def _build_loader(
    dataset: PatchDataset, cfg: TrainConfig, ctx: Dist, start_step: int, device: torch.device
) -> DataLoader:
    workers = cfg.workers
    if workers < 0:  # cached pairs make a sample a memcpy: worker processes only add overhead
        uncached = dataset.cached_count < len(dataset.entries)
        workers = min(4, max(1, cpu_count() // ctx.world_size)) if uncached else 0
    sampler = StepBatchSampler(cfg.seed, ctx.rank, cfg.batch_size, start_step, cfg.steps)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def run(cfg: TrainConfig, ckpt: dict[str, Any] | None, ctx: Dist) -> int:
    """Set up model, optimizer and data (fresh, --init, or resumed from ``ckpt``: the run's
    last.pt, loaded once by ``main``), train, write best.pt."""
    out = Path(cfg.out)
    last = out / LAST
    device = pick_device(cfg.device, ctx)
    torch.set_num_threads(threads_per_rank(ctx))

    if ckpt is not None:
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
    else:
        if last.exists():
            raise UsageError(f"{last} exists; pass --resume to continue that run or pick --out")
        torch.manual_seed(cfg.seed)
        model = RDN(cfg.model_config())
        state = RunState()
        if cfg.init is not None:
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

    if cfg.val is not None and not list_images(Path(cfg.val)):  # fail now, not at the first val
        raise DataError(f"validation folder {cfg.val}: no images")
    dataset = build_dataset(
        Path(cfg.data) if cfg.data else None,
        cfg.scale,
        cfg.patch_size,
        cache_bytes=cfg.cache_mb * 2**20,
        skip_bad=cfg.skip_bad_images,
        channel_shuffle=cfg.channel_shuffle,
        degradation=cfg.degradation_spec(),
    )
    names = [e.name for e in dataset.entries]
    if ckpt is not None and ckpt.get("data_images") not in (None, names):
        raise CheckpointError(
            f"checkpoint {last}: the training images changed ({len(ckpt['data_images'])} then, "
            f"{len(names)} now); resume needs the same set - start a new run with --init"
        )

    if ctx.is_main:  # only now: a run that fails its checks leaves no folder behind
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.pt.*.tmp"):  # left by a kill during an atomic write
            stale.unlink(missing_ok=True)
    model.to(device)
    if cfg.qat and ckpt is None:
        # the first QAT_CALIBRATION batches of the step-0 stream, whatever cfg.steps is
        first = dataclasses.replace(cfg, steps=QAT_CALIBRATION)
        calibration = _build_loader(dataset, first, ctx, 0, device)
        seen = calibrate(model, (lr_images for lr_images, _ in calibration))
        log.info("--qat: activation ranges calibrated on %d training batches", seen)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    ema = make_ema(model, cfg.ema)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        if ema is not None:
            if "ema" not in ckpt:
                raise CheckpointError(f"checkpoint {last}: ema={cfg.ema} but no average stored")
            ema.load_state_dict(ckpt["ema"])
    log.info(
        "model %s: %d parameters; %d steps, batch %d x %d process(es), patch %d, lr %.2e "
        "%s, BN frozen after %d, degradation %s, EMA %s, device %s",
        model.config,
        sum(p.numel() for p in model.parameters()),
        cfg.steps,
        cfg.batch_size,
        ctx.world_size,
        cfg.patch_size,
        cfg.lr,
        "cosine to 0" if cfg.schedule == "cosine" else f"halved every {cfg.lr_half_every}",
        cfg.bn_freeze_after,
        cfg.degradation,
        cfg.ema or "off",
        device,
    )
    if batchnorm_layers(model) and cfg.bn_freeze_after >= cfg.steps:
        log.warning("bn_freeze_after >= steps: BatchNorm is never frozen in this run")

    wrapped: nn.Module = model
    if ctx.enabled:
        wrapped = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    loader = _build_loader(dataset, cfg, ctx, state.step, device)
    extra = {"data_images": names}
    if state.step < cfg.steps:
        state = train_loop(
            wrapped, model, optimizer, loader, device, cfg, state, ctx, extra, ema=ema
        )
    else:
        log.info("already at step %d of %d: nothing to train", state.step, cfg.steps)

    ok, hashes = same_weights_on_all_ranks(model, ctx)  # every rank must hold the same weights
    if ctx.is_main:
        append_metrics(
            out / METRICS, {"step": state.step, "event": "end", "rank_state_sha256": hashes}
        )
        if (cfg.val is None and ema is None) or not (out / BEST).exists():
            # No validation set: the final weights are the best we can name.
            final = load_checkpoint(last)
            save_checkpoint(out / BEST, final)
        log.info("done: %s and %s in %s", LAST, BEST, out)
    if not ok:
        log.error("ranks ended with different weights: %s", hashes)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ctx = dist_from_env()
    logging.basicConfig(
        level=logging.INFO if ctx.is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        args = vars(build_parser().parse_args(argv))
        resume = bool(args.pop("resume", False))
        config_file = args.pop("config", None)
        options = read_toml_config(config_file) if config_file is not None else {}
        options.update(args)  # flags override the config file
        ckpt = None
        if resume:
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
            options = {**stored_train_config(stored), **options}
        cfg = make_train_config(options)
    except UsageError as e:
        print(f"rdn-train: error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"rdn-train: error: {e}", file=sys.stderr)
        return 1

    init_process_group(ctx, cfg.device)
    try:
        code = run(cfg, ckpt, ctx)
        if ctx.enabled:
            # Tear down together: a rank that closes its gloo pairs while the other still writes
            # its last files was the suspect of one SIGABRT at exit (not reproduced in 18 runs).
            dist.barrier()
        return code
    except (UsageError, DeviceError) as e:
        print(f"rdn-train: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, DataError, ImageReadError, FileNotFoundError) as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        print(f"rdn-train: error: {lines[-1] if lines else type(e).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rdn-train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    finally:
        destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
