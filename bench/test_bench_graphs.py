"""Launch overhead: CARN's and CaM-HG's inference and training step (forward + backward) eager, compiled
(``torch.compile(mode="reduce-overhead")``, which replays CUDA graphs) and captured by hand in one CUDA graph
(``torch.cuda.graph``, replayed), at the shapes of bench/test_bench_carn.py and bench/test_bench_camhg.py, our
kernels throughout. At T = 110 each kernel runs for microseconds: the gap between eager and a graph is what the
host's launches cost. The budgeted run (``BENCH_QUICK=1``) leaves out the compiled cases (their compile takes a
minute). GPU only.

    pytest bench/test_bench_graphs.py --benchmark-only
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from conftest import bench_call, requires_cuda, skip_in_quick_run
from kernels import use_backend

CANDIDATES = ["ours", "compiled", "cuda-graph"]  # ours: eager


def _carn(device):
    from test_bench_carn import IEMOCAP, make_batches, make_model

    model = make_model(IEMOCAP, device).eval()  # eval: no dropout, the same work in every mode
    full, observed = make_batches(IEMOCAP, device)
    labels = full.labels.masked_fill(~full.valid, -100)

    def loss_of(model):
        logits = model(observed.features, observed.present, observed.valid).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    return model, loss_of


def _camhg(device):
    from test_bench_camhg import IEMOCAP_TEST, make_inputs, make_model

    model = make_model(IEMOCAP_TEST, device).eval()
    features, present, speakers, labels, valid = make_inputs(IEMOCAP_TEST["dialogues"], IEMOCAP_TEST["utterances"],
                                                             IEMOCAP_TEST["dims"], device)
    labels = labels.masked_fill(~valid, -100)

    def loss_of(model):
        out = model(features, present, speakers)
        return (torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
                + out.restored.float().square().mean() + out.aux_loss)

    return model, loss_of


MODELS = {"carn B32-L110": _carn, "camhg B31-U1623-d512": _camhg}


def _step(model, loss_of, train: bool) -> Callable[[], torch.Tensor]:
    def step():
        if not train:
            with torch.no_grad():
                return loss_of(model)
        model.zero_grad(set_to_none=True)
        loss = loss_of(model)
        loss.backward()
        return loss

    return step


def _graphed(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``step`` captured once in a CUDA graph (after a warm-up on a side stream, as capture requires), returned as its
    replay; a training step's ``zero_grad(set_to_none=True)`` runs at capture, so its backward writes the gradients
    into the graph's own buffers at every replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()

    def replay():
        graph.replay()
        return static_loss

    return replay


@requires_cuda
@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("train", [False, True], ids=["inference", "train-step"])
@pytest.mark.parametrize("name", list(MODELS))
def test_launch_overhead_gpu(benchmark, device, name, train, candidate):
    benchmark.group = f"{name.split()[0]} {'train-step (fwd+bwd)' if train else 'inference'} {name.split()[1]} modes"
    skip_in_quick_run(candidate != "compiled", "torch.compile (a minute of compile per case)")
    model, loss_of = MODELS[name](device)
    with use_backend("auto"):
        if candidate == "compiled":
            model = torch.compile(model, mode="reduce-overhead")
        step = _step(model, loss_of, train)
        if candidate == "cuda-graph":
            step = _graphed(step)
        bench_call(benchmark, step)
