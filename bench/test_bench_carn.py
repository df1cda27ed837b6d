"""CARN end to end: inference throughput and a training step of each stage, fused kernels vs the reference path.

IEMOCAP scale: 32 dialogues of up to 110 utterances, features a 512 / t 1024 / v 1024, the published-feature model
width (``carn.config`` preset ``iemocap4``). The target: the fused path at least 3x as fast as the reference path on
the same GPU. ``extra_info`` records utterances/s of every case. On CPU only a tiny reference case runs.

    pytest bench/test_bench_carn.py --benchmark-only
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from carn.config import TrainConfig, model_config_for, preset
from carn.losses import stage_losses
from carn.model import CARN
from conftest import bench_call, requires_cuda
from kernels import use_backend
from mer.data import DatasetInfo, Dialogue, collate_dialogues
from mer.missing import batch_missing_mask

IEMOCAP = dict(dialogues=32, max_length=110, dims={"a": 512, "t": 1024, "v": 1024}, hidden=None)
TINY = dict(dialogues=2, max_length=12, dims={"a": 32, "t": 48, "v": 40}, hidden=16)


def make_batches(shape: dict, device, seed: int = 0):
    """(full, observed): a batch of random dialogues (the longest ``max_length``) with every modality, and the
    same batch with half of the modalities masked as in stage 2."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(shape["max_length"] // 4, shape["max_length"] + 1, shape["dialogues"])
    lengths[0] = shape["max_length"]
    dialogues = [
        Dialogue(f"d{i}", {m: rng.normal(size=(n, d)).astype(np.float32) for m, d in shape["dims"].items()},
                 rng.integers(0, 2, n), rng.integers(0, 4, n))
        for i, n in enumerate(lengths)
    ]
    full = collate_dialogues(dialogues).to(device)
    return full, full.with_present(batch_missing_mask(full, 0.5, seed))


def make_model(shape: dict, device) -> CARN:
    torch.manual_seed(0)
    info = DatasetInfo("bench", "classification", 4, ["c0", "c1", "c2", "c3"], shape["dims"])
    overrides = {"hidden": shape["hidden"]} if shape["hidden"] else {}
    return CARN(model_config_for(info, "iemocap4", **overrides)).to(device)


def record_throughput(benchmark, utterances: int) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    benchmark.extra_info["utterances_per_s"] = round(utterances / stats.stats.mean, 1)


def run_inference(benchmark, shape: dict, device, backend: str) -> None:
    model = make_model(shape, device).eval()
    _, observed = make_batches(shape, device)

    def infer():
        with use_backend(backend), torch.no_grad():
            return model(observed.features, observed.present, observed.valid).logits

    bench_call(benchmark, infer)
    record_throughput(benchmark, int(observed.valid.sum()))


def run_train_step(benchmark, shape: dict, device, backend: str, stage: int) -> None:
    model = make_model(shape, device).train()
    model.set_stage(stage)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=preset("iemocap4").train.lr)
    full, observed = make_batches(shape, device)
    seen = full if stage == 1 else observed
    train_config = TrainConfig()

    def step():
        with use_backend(backend):
            output = model(seen.features, seen.present, seen.valid)
            loss = stage_losses(output, full, seen, stage, model.config, train_config)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return loss

    bench_call(benchmark, step)
    record_throughput(benchmark, int(full.valid.sum()))


@requires_cuda
@pytest.mark.parametrize("backend", ["auto", "reference"], ids=["ours", "reference"])
def test_carn_inference_iemocap(benchmark, device, backend):
    benchmark.group = "carn inference B32-L110"
    run_inference(benchmark, IEMOCAP, device, backend)


@requires_cuda
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("backend", ["auto", "reference"], ids=["ours", "reference"])
def test_carn_train_step_iemocap(benchmark, device, backend, stage):
    benchmark.group = f"carn train-step stage {stage} B32-L110"
    run_train_step(benchmark, IEMOCAP, device, backend, stage)


def test_carn_inference_tiny_reference(benchmark, device):
    benchmark.group = "carn inference B2-L12"
    run_inference(benchmark, TINY, device, "reference")


def test_carn_train_step_tiny_reference(benchmark, device):
    benchmark.group = "carn train-step stage 1 B2-L12"
    run_train_step(benchmark, TINY, device, "reference", 1)
