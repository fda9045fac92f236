"""rdn-train's configuration: every hyperparameter in one frozen dataclass, read from flags and a
TOML file (flags > --config TOML > the resumed run's settings > defaults).

``TrainConfig`` is stored in every checkpoint as ``train_config``; ``make_train_config`` derives
what was not given (learning rate per preset, schedule and BatchNorm freeze from ``steps``);
``build_parser`` is rdn-train's command line, whose flags default to "not given" so that the
TOML file and a resumed run can fill them. docs/training.md tells why the defaults are these.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rdn.constants import DEFAULT_SCALE, SCALES
from rdn.data import DEFAULT_CACHE_BYTES
from rdn.degradations import Degradation, DegradationError, PhotoRanges, parse_degradation
from rdn.model import NORMS, PRESETS, RDNConfig

# Base learning rate per preset: the paper's 1e-4 for the large presets, more for the small ones
# (docs/training.md, "Training: why these defaults").
DEFAULT_LR: dict[str, float] = {"paper": 1e-4, "medium": 1e-4, "small": 2e-3, "tiny": 4e-3}
SCHEDULES = ("step", "cosine")


class UsageError(ValueError):
    """A bad command line or config value (exit status 2)."""


@dataclass(frozen=True)
class TrainConfig:
    """Every training hyperparameter; stored in each checkpoint as ``train_config``."""

    data: str | None = None  # folder of HR images; None: scikit-image's photographs
    val: str | None = None  # folder of HR images for PSNR/SSIM; None: best.pt = final weights
    scale: int = DEFAULT_SCALE
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
    # With qat: the twin learns the --init model's outputs (in float) instead of the HR
    # images, so it stays that model's twin whatever the training degradation.
    qat_distill: bool = False
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
        need(not self.qat_distill or self.qat, "--qat-distill needs --qat")
        for name in ("skip_bad_images", "channel_shuffle", "qat", "qat_distill"):
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
    p.add_argument(
        "--qat-distill",
        action="store_true",
        help="with --qat: learn the --init model's float outputs instead of the HR images "
        "(the twin matches its float model on every input the training degradation makes)",
    )
    p.add_argument("--out", help=f"run directory (default {d.out})")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    return p
