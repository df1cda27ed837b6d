"""CaM-HG end to end: inference throughput/latency and a training step, fused kernels vs the reference path.

Shape of the IEMOCAP-6 test set (paper Table 1): 31 dialogues, 1,623 utterances, d = 512, features
a 512 / t 1024 / v 1024. The paper reports 2,613.83 utterances/s (0.38 ms/utt) on an RTX 4090; the targets are 20x
that on one H100-class GPU and 3x the reference path on the same GPU. ``extra_info`` records
utterances/s and ms/utterance of every case. On CPU only a tiny reference case runs.

    pytest bench/test_bench_camhg.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from camhg import CaMHG, preset
from conftest import bench_call, requires_cuda
from kernels import use_backend

PAPER_UTTERANCES_PER_S = 2613.83
IEMOCAP_TEST = dict(dialogues=31, utterances=1623, hidden=512, dims={"a": 512, "t": 1024, "v": 1024})
TINY = dict(dialogues=2, utterances=20, hidden=32, dims={"a": 32, "t": 48, "v": 40})


def make_inputs(dialogues: int, utterances: int, dims: dict, device, seed: int = 0):
    """Right-padded random dialogues whose lengths sum to ``utterances``; a random half of the modalities missing."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(dialogues, generator=g) + 0.5
    lengths = torch.floor(weights / weights.sum() * utterances).long().clamp(min=1)
    lengths[0] += utterances - lengths.sum()
    length = int(lengths.max())
    valid = torch.arange(length)[None] < lengths[:, None]
    features = {m: torch.randn(dialogues, length, d, generator=g) * valid[..., None] for m, d in dims.items()}
    present = (torch.rand(dialogues, length, 3, generator=g) > 0.5) & valid[..., None]
    present[..., 1] |= valid & ~present.any(-1)
    speakers = torch.randint(0, 2, (dialogues, length), generator=g) * valid
    labels = torch.randint(0, 6, (dialogues, length), generator=g)
    to = lambda t: t.to(device)  # noqa: E731
    return {m: to(x) for m, x in features.items()}, to(present), to(speakers), to(labels), to(valid)


def make_model(shape: dict, device) -> CaMHG:
    torch.manual_seed(0)
    return CaMHG(preset("iemocap6", hidden=shape["hidden"]), shape["dims"], num_classes=6).to(device)


def record_throughput(benchmark, utterances: int) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    seconds = stats.stats.mean
    benchmark.extra_info["utterances_per_s"] = round(utterances / seconds, 1)
    benchmark.extra_info["ms_per_utterance"] = round(1e3 * seconds / utterances, 4)
    benchmark.extra_info["x_paper_rtx4090"] = round(utterances / seconds / PAPER_UTTERANCES_PER_S, 2)


def run_inference(benchmark, shape: dict, device, backend: str) -> None:
    model = make_model(shape, device).eval()
    features, present, speakers, _, _ = make_inputs(shape["dialogues"], shape["utterances"], shape["dims"], device)

    def infer():
        with use_backend(backend), torch.no_grad():
            return model(features, present, speakers).logits

    bench_call(benchmark, infer)
    record_throughput(benchmark, shape["utterances"])


def run_train_step(benchmark, shape: dict, device, backend: str) -> None:
    model = make_model(shape, device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    features, present, speakers, labels, valid = make_inputs(shape["dialogues"], shape["utterances"], shape["dims"],
                                                             device)

    def step():
        with use_backend(backend):
            out = model(features, present, speakers)
            loss = torch.nn.functional.cross_entropy(out.logits[valid], labels[valid]) + out.restored.square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return loss

    bench_call(benchmark, step)
    record_throughput(benchmark, shape["utterances"])


@requires_cuda
@pytest.mark.parametrize("backend", ["auto", "reference"], ids=["ours", "reference"])
def test_camhg_inference_iemocap_test(benchmark, device, backend):
    benchmark.group = "camhg inference B31-U1623-d512"
    run_inference(benchmark, IEMOCAP_TEST, device, backend)


@requires_cuda
@pytest.mark.parametrize("backend", ["auto", "reference"], ids=["ours", "reference"])
def test_camhg_train_step_iemocap_test(benchmark, device, backend):
    benchmark.group = "camhg train-step B31-U1623-d512"
    run_train_step(benchmark, IEMOCAP_TEST, device, backend)


def test_camhg_inference_tiny_reference(benchmark, device):
    benchmark.group = "camhg inference B2-U20-d32"
    run_inference(benchmark, TINY, device, "reference")
