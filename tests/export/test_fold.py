"""BatchNorm folding is exact and leaves the source model alone; the weights hash is stable."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from export.to_onnx import count_batchnorms, fold_batchnorm, weights_sha256
from rdn.checkpoint import load_checkpoint, load_model
from rdn.model import RDN, RDNConfig, batchnorm_layers


def test_fold_is_exact_and_removes_every_batchnorm(tiny_checkpoint: Path) -> None:
    model, _ = load_model(tiny_checkpoint)
    stats = [
        (bn.running_mean.abs().max().item(), bn.running_var.max().item())
        for bn in batchnorm_layers(model)
    ]
    assert any(mean > 0.05 or var > 1.5 or var < 0.5 for mean, var in stats)  # far from (0, 1)
    folded = fold_batchnorm(model)
    assert count_batchnorms(model) == 12 and count_batchnorms(folded) == 0
    assert all(isinstance(rdb.lff_norm, nn.Identity) for rdb in folded.rdbs)
    x = torch.rand(3, 3, 29, 21, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        reference, result = model(x), folded(x)
    assert (reference - result).abs().max().item() <= 1e-5
    assert reference.abs().mean().item() > 1e-3  # not a trivially zero output


def test_fold_returns_a_copy(tiny_checkpoint: Path) -> None:
    model, data = load_model(tiny_checkpoint)
    before = weights_sha256(model.state_dict())
    folded = fold_batchnorm(model)
    assert weights_sha256(model.state_dict()) == before == weights_sha256(data["model"])
    assert count_batchnorms(model) == 12
    assert (
        folded.rdbs[0].layers[0].conv.weight.data_ptr()
        != model.rdbs[0].layers[0].conv.weight.data_ptr()
    )
    assert not folded.training


def test_fold_of_a_model_without_batchnorm_changes_nothing() -> None:
    torch.manual_seed(0)
    model = RDN(RDNConfig.from_preset("tiny", scale=3, norm="none")).eval()
    folded = fold_batchnorm(model)
    assert weights_sha256(folded.state_dict()) == weights_sha256(model.state_dict())


def test_weights_hash_tracks_every_tensor(tiny_checkpoint: Path) -> None:
    state = load_checkpoint(tiny_checkpoint)["model"]
    digest = weights_sha256(state)
    assert len(digest) == 64 and digest == weights_sha256(dict(reversed(list(state.items()))))
    nudged = dict(state)
    key = "rdbs.0.lff_norm.running_var"
    nudged[key] = state[key].clone()
    nudged[key][0] += 1e-6
    assert weights_sha256(nudged) != digest
