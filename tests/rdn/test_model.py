"""RDN architecture (paper parameter counts, shapes) and the frozen-BatchNorm contract."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from rdn.checkpoint import load_checkpoint, make_payload, model_from_checkpoint, save_checkpoint
from rdn.model import (
    RDN,
    RDNConfig,
    batchnorm_frozen,
    batchnorm_layers,
    count_parameters,
    freeze_batchnorm,
)


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One thread per test process: on 2 shared cores, more threads spin-wait on each other.

    OMP_NUM_THREADS also reaches in-process ``main()``, which honours it.
    """
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(scale: int = 2, norm: str = "batch") -> RDN:
    torch.manual_seed(0)
    return RDN(RDNConfig.from_preset("tiny", scale=scale, norm=norm))


def calibrated_tiny() -> RDN:
    """A tiny RDN whose BN statistics moved away from (0, 1) in a few train-mode passes."""
    model = tiny().train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 3, 20, 20) * 0.8 + 0.1)
    return model


def running_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


@pytest.mark.parametrize(("scale", "expected"), [(2, 22_123_395), (3, 22_308_035), (4, 22_271_107)])
def test_paper_preset_parameter_counts_match_reference(scale: int, expected: int) -> None:
    model = RDN(RDNConfig.from_preset("paper", scale=scale, norm="none"))
    assert count_parameters(model) == expected


def test_batchnorm_adds_two_parameters_per_channel_of_each_dense_and_lff_conv() -> None:
    config = RDNConfig.from_preset("tiny", scale=2)
    G0, D, C, G = config.G0, config.D, config.C, config.G
    with_bn = count_parameters(RDN(config))
    without = count_parameters(RDN(RDNConfig.from_preset("tiny", scale=2, norm="none")))
    assert with_bn - without == D * (C * 2 * G + 2 * G0)
    assert len(batchnorm_layers(RDN(config))) == D * (C + 1)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize(("h", "w"), [(7, 11), (13, 5)])
def test_output_is_scale_times_input_for_odd_sizes(scale: int, h: int, w: int) -> None:
    model = tiny(scale).eval()
    with torch.no_grad():
        y = model(torch.rand(2, 3, h, w))
    assert y.shape == (2, 3, h * scale, w * scale)


def test_unfrozen_batchnorm_differs_between_train_and_eval() -> None:
    """Baseline for the frozen tests below: before freezing, the two modes really differ."""
    model = calibrated_tiny()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        train_out = model.train()(x)
        eval_out = model.eval()(x)
    assert (train_out - eval_out).abs().max() > 1e-3


def test_frozen_model_computes_the_same_function_in_train_and_eval_mode() -> None:
    model = calibrated_tiny()
    assert freeze_batchnorm(model) == len(batchnorm_layers(model)) > 0
    assert batchnorm_frozen(model)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        train_out = model.train()(x)
        eval_out = model.eval()(x)
    torch.testing.assert_close(train_out, eval_out, rtol=0, atol=0)


def test_running_statistics_never_change_after_freeze_but_affine_weights_train() -> None:
    model = calibrated_tiny()
    freeze_batchnorm(model)
    before = running_stats(model)
    bn = batchnorm_layers(model)[0]
    gamma_before = bn.weight.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        loss = nn.functional.l1_loss(model(torch.rand(2, 3, 12, 12)), torch.rand(2, 3, 24, 24))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = running_stats(model)
    assert before.keys() == after.keys() and before
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    assert not torch.equal(bn.weight.detach(), gamma_before)
    assert batchnorm_frozen(model.train())  # train() does not unfreeze


def test_freeze_state_survives_checkpoint_round_trip(tmp_path: Path) -> None:
    model = calibrated_tiny()
    freeze_batchnorm(model)
    path = tmp_path / "frozen.pt"
    save_checkpoint(path, make_payload(model, step=5))
    data = load_checkpoint(path)
    assert data["bn_frozen"] is True
    loaded = model_from_checkpoint(data, path).train()
    assert batchnorm_frozen(loaded)
    stats = running_stats(loaded)
    x = torch.rand(2, 3, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    for key, value in running_stats(loaded).items():  # the train-mode pass changed nothing
        torch.testing.assert_close(value, stats[key], rtol=0, atol=0)


def test_unfrozen_checkpoint_loads_unfrozen(tmp_path: Path) -> None:
    model = calibrated_tiny()
    path = tmp_path / "calibrating.pt"
    save_checkpoint(path, make_payload(model, step=1))
    loaded = model_from_checkpoint(load_checkpoint(path), path)
    assert load_checkpoint(path)["bn_frozen"] is False
    assert not batchnorm_frozen(loaded)


def test_model_without_batchnorm_counts_as_frozen() -> None:
    model = tiny(norm="none")
    assert batchnorm_layers(model) == []
    assert freeze_batchnorm(model) == 0
    assert batchnorm_frozen(model)
