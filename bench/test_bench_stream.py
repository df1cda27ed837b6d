"""Streaming throughput: live conversations advanced one utterance at a time through ``model.stream(B)`` (per-layer
KV caches, ``kernels.*_with_kvcache``), CaM-HG (d = 512) and causal CARN (hidden 256, its published presets') at
IEMOCAP feature sizes (a 512 / t 1024 / v 1024), batch 1 (one live conversation: latency) and batch 64 (64 live conversations in one call: serving).

One timed call streams a 32-utterance dialogue into a fresh stream, every modality present; ``extra_info`` records
streamed utterances/s (batch x 32 / seconds) and ms per push. On CPU only a tiny case runs. The CPU latency
comparison (utterance 10 vs 100, streamed dialogue vs offline forward) is ``bench/stream_latency.py``.

    pytest bench/test_bench_stream.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from camhg.config import CaMHGConfig
from camhg.model import CaMHG
from carn.config import ModelConfig
from carn.model import CARN
from conftest import bench_call, requires_cuda

IEMOCAP = dict(hidden=512, dims={"a": 512, "t": 1024, "v": 1024})
CARN_HIDDEN = 256  # CARN's published presets: its one-head causal-cue attention is 256 wide (the kernels' widest)
TINY = dict(hidden=32, dims={"a": 32, "t": 48, "v": 40})
UTTERANCES = 32


def make_model(name: str, shape: dict, device) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "camhg":
        model = CaMHG(CaMHGConfig(hidden=shape["hidden"], heads=8), shape["dims"], 6)
    else:
        hidden = min(shape["hidden"], CARN_HIDDEN)
        model = CARN(ModelConfig(dims=shape["dims"], num_classes=6, hidden=hidden, encoder_mask="causal"))
    return model.to(device).eval()


def run_stream(benchmark, name: str, shape: dict, batch: int, device) -> None:
    model = make_model(name, shape, device)
    g = torch.Generator().manual_seed(0)
    features = {m: torch.randn(UTTERANCES, batch, d, generator=g).to(device) for m, d in shape["dims"].items()}
    speakers = torch.randint(0, 2, (UTTERANCES, batch), generator=g).to(device)

    def stream_dialogue():
        stream = model.stream(batch)
        for t in range(UTTERANCES):
            out = stream.push(audio=features["a"][t], text=features["t"][t], video=features["v"][t],
                              speaker=speakers[t])
        return out

    bench_call(benchmark, stream_dialogue)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # not with --benchmark-disable
        seconds = stats.stats.mean
        benchmark.extra_info["utterances_per_s"] = round(batch * UTTERANCES / seconds, 1)
        benchmark.extra_info["ms_per_push"] = round(1e3 * seconds / UTTERANCES, 3)


@requires_cuda
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("name", ["camhg", "carn"])
def test_stream_iemocap_size(benchmark, device, name, batch):
    benchmark.group = f"{name} stream B{batch}-U{UTTERANCES}-d{512 if name == 'camhg' else CARN_HIDDEN}"
    run_stream(benchmark, name, IEMOCAP, batch, device)


@pytest.mark.parametrize("name", ["camhg", "carn"])
def test_stream_tiny(benchmark, device, name):
    benchmark.group = f"{name} stream B2-U{UTTERANCES}-d32"
    run_stream(benchmark, name, TINY, 2, device)
