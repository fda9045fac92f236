"""Train RDN: L1 loss, Adam, step-decayed learning rate, BatchNorm frozen after calibration.

``rdn-train --preset tiny --scale 2 --steps 300 --out runs/tiny`` trains on the photographs
scikit-image ships; ``--data DIR`` trains on a folder of HR images. Under
``torchrun --nproc_per_node N`` training is DistributedDataParallel and every rank draws its
own patches. ``RUN_DIR/last.pt`` is rewritten atomically every ``--save-every`` steps and
``--resume`` continues from it, reproducing the uninterrupted run (``rdn.resume``).

Defaults are the paper's recipe (L1, Adam 0.9/0.999/1e-8, batch 16, 48x48 LR patches, lr
1e-4 halved every 200 epochs of 1000 iterations) with three departures, each measured: a larger
learning rate for the small presets (``DEFAULT_LR``), a schedule and BN freeze that scale with
``--steps``, and RGB channel permutation of the patches. docs/training.md ("Training: why these
defaults") tells what was measured. The recipe, top to bottom: ``main`` reads the options
(``rdn.train_config``; and the run's ``last.pt``, once, for ``--resume``), ``run`` builds the
model (fresh, ``--init`` or resumed: ``rdn.resume``), data and optimizer, ``train_loop``
trains, validates and checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from rdn.checkpoint import CheckpointError, load_checkpoint, make_payload, save_checkpoint
from rdn.data import DataError, PatchDataset, StepBatchSampler, build_dataset
from rdn.degradations import Degradation
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
from rdn.int8 import QAT_MOMENTUM, calibrate
from rdn.model import RDN, batchnorm_frozen, batchnorm_layers, freeze_batchnorm
from rdn.progress import Progress, append_metrics
from rdn.quant import configure
from rdn.resume import (
    LAST,
    RunState,
    distill_teacher,
    resume_options,
    rng_state,
    starting_point,
)
from rdn.train_config import (
    TrainConfig,
    UsageError,
    build_parser,
    make_train_config,
    read_toml_config,
)

log = logging.getLogger("rdn.train")

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
QAT_CALIBRATION = 16  # training batches whose activation extremes start a --qat run
BEST, METRICS = "best.pt", "metrics.jsonl"


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


def train_one_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_images: torch.Tensor,
    hr_images: torch.Tensor,
    teacher: nn.Module | None = None,
) -> torch.Tensor:
    """One optimizer step on one batch; returns the detached loss (no device sync). With a
    ``teacher`` the target is its output for the same LR (``--qat-distill``), not the HR."""
    if teacher is not None:
        with torch.no_grad():
            hr_images = teacher(lr_images)
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
    teacher: nn.Module | None = None,
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
            loss = train_one_step(model, criterion, optimizer, lr_images, hr_images, teacher)
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
    last.pt, loaded once by ``main``; ``rdn.resume.starting_point`` decides), train, write
    best.pt."""
    out = Path(cfg.out)
    last = out / LAST
    device = pick_device(cfg.device, ctx)
    torch.set_num_threads(threads_per_rank(ctx))

    start = starting_point(cfg, ckpt, ctx)
    model, state = start.model, start.state

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
    start.check_images(names)

    if ctx.is_main:  # only now: a run that fails its checks leaves no folder behind
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.pt.*.tmp"):  # left by a kill during an atomic write
            stale.unlink(missing_ok=True)
    model.to(device)
    if cfg.qat and not start.resumed:
        # the first QAT_CALIBRATION batches of the step-0 stream, whatever cfg.steps is
        first = dataclasses.replace(cfg, steps=QAT_CALIBRATION)
        calibration = _build_loader(dataset, first, ctx, 0, device)
        seen = calibrate(model, (lr_images for lr_images, _ in calibration))
        log.info("--qat: activation ranges calibrated on %d training batches", seen)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    ema = make_ema(model, cfg.ema)
    teacher = distill_teacher(cfg)
    if teacher is not None:
        teacher.to(device)
    start.restore(optimizer, ema, cfg)
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
            wrapped,
            model,
            optimizer,
            loader,
            device,
            cfg,
            state,
            ctx,
            extra,
            ema=ema,
            teacher=teacher,
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
            options, ckpt = resume_options(options)
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
