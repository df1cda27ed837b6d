"""Streaming cost on the CPU: per-utterance latency at utterance 10 and 100 of a dialogue, and a whole dialogue
streamed utterance by utterance against one offline forward over it, for CaM-HG and causal CARN (eval mode, random
weights, every modality present, batch 1).

    python bench/stream_latency.py                       # hidden 64, the small feature sizes (the embedded runs')
    python bench/stream_latency.py --hidden 512 --dims full --repeats 5

Prints per model, in process CPU time (steadier than wall time on a shared machine), medians over ``--repeats``
rounds: the push latency around utterance 10 and around utterance 100 (the pushes of a 10-utterance window pooled)
and their ratio (flat latency: close to 1), the creation of the stream (``model.stream()``, which takes and packs
the weights), the ``--length`` pushes of a whole dialogue and one offline forward over it, and their cost ratio.
``--threads`` sets torch's intra-op threads (default 1: the numbers of one core). The GPU case is
``bench/test_bench_stream.py``.

Why a stream costs several offline forwards on a CPU: a push multiplies every weight matrix of the model by one
utterance's row (or its 3 nodes' rows), so it reads all the weights (CaM-HG at hidden 512: 99 MB per push; causal
CARN: 65 MB, its reconstruction decoder not needed) at the rate of a matrix-vector product, bound by memory
bandwidth, while the offline forward runs the same multiply-adds as matrix products over 110 or 330 rows, bound by
arithmetic. On one core of the machine measured (AMD EPYC, AVX2, MKL and oneDNN from the PyTorch wheel): a 1-row
product reads an (out, in) weight at 11 GB/s and an (in, out) one at 17 GB/s when out > in, 3 rows read at 5-6 GB/s
with MKL and 8.5-9 GB/s with oneDNN on packed weights (``mer.streaming.StreamLinear`` takes the faster form of each);
CaM-HG's linear maps of one push then take about 9 ms, 2.3x its offline forward over 110 pushes before any
attention or elementwise work (docs/performance.md, "Streaming on a CPU").
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from camhg.config import CaMHGConfig
from camhg.model import CaMHG
from carn.config import ModelConfig
from carn.model import CARN
from kernels.backend import requested_backend
from mer.embedded import FULL_DIMS, SMALL_DIMS

WINDOW = 10  # utterances pooled around utterance 10 and 100 for their latency


def build(model: str, hidden: int, dims: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    if model == "camhg":
        return CaMHG(CaMHGConfig(hidden=hidden, heads=8), dims, 4).eval()
    return CARN(ModelConfig(dims=dims, num_classes=4, hidden=hidden, encoder_mask="causal")).eval()


@torch.no_grad()
def measure(model: torch.nn.Module, length: int, repeats: int, device) -> dict:
    """Medians over ``repeats`` rounds (after one warm-up round) of process CPU seconds: "utt10" and "utt100", the
    pushes of the utterances in a window of ``WINDOW`` around utterance 10 and 100 (every round's pushes of the
    window pooled); "create", ``model.stream()``; "stream", the ``length`` pushes of a whole dialogue; "offline",
    one forward over it."""
    dims = model.dims if isinstance(model, CaMHG) else model.config.dims
    features = {m: torch.randn(1, length, d, device=device) for m, d in dims.items()}
    present = torch.ones(1, length, 3, dtype=torch.bool, device=device)
    speakers = torch.randint(0, 2, (1, length), device=device)
    valid = torch.ones(1, length, dtype=torch.bool, device=device)
    pushes, creates, streams, offlines = [], [], [], []
    for _ in range(repeats + 1):  # the first round warms up; streamed and offline rounds alternate
        began = time.process_time()
        stream = model.stream()
        creates.append(time.process_time() - began)
        times = []
        began = time.process_time()
        for t in range(length):
            start = time.process_time()
            stream.push(audio=features["a"][0, t], text=features["t"][0, t], video=features["v"][0, t],
                        speaker=speakers[0, t])
            times.append(time.process_time() - start)
        streams.append(time.process_time() - began)
        pushes.append(times)
        began = time.process_time()
        if isinstance(model, CaMHG):
            model(features, present, speakers, valid=valid)
        else:
            model(features, present, valid)
        offlines.append(time.process_time() - began)
    pushes, creates, streams, offlines = pushes[1:], creates[1:], streams[1:], offlines[1:]

    def around(t: int) -> float:
        window = range(max(t - WINDOW // 2, 0), min(t + WINDOW // 2, length))
        return statistics.median(p[i] for p in pushes for i in window)

    return {"utt10": around(10), "utt100": around(100), "create": statistics.median(creates),
            "stream": statistics.median(streams), "offline": statistics.median(offlines)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64, help="model width (default 64)")
    parser.add_argument("--dims", choices=("small", "full"), default="small",
                        help="feature sizes: small a 32 / t 48 / v 40, full a 512 / t 1024 / v 1024 (default small)")
    parser.add_argument("--length", type=int, default=110, help="utterances of the dialogue (default 110)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--models", nargs="+", choices=("camhg", "carn"), default=("camhg", "carn"),
                        help="the models to measure (default both)")
    args = parser.parse_args(argv)
    if args.length <= 100:
        parser.error(f"--length must be > 100 (utterance 100's latency is measured), got {args.length}")
    torch.set_num_threads(args.threads)
    dims = dict(SMALL_DIMS if args.dims == "small" else FULL_DIMS)
    print(f"CPU, {args.threads} thread(s), hidden {args.hidden}, dims {dims}, a {args.length}-utterance dialogue, "
          f"medians of {args.repeats} rounds of process CPU time, KERNELS_BACKEND {requested_backend()}")
    print("| model | utterance 10 (ms) | utterance 100 (ms) | latency ratio (100 / 10) | stream creation (CPU s) | "
          "streamed dialogue (CPU s) | offline forward (CPU s) | cost ratio (streamed / offline) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        r = measure(build(name, args.hidden, dims), args.length, args.repeats, torch.device("cpu"))
        title = "CaM-HG" if name == "camhg" else "CARN (encoder_mask=causal)"
        print(f"| {title} | {1e3 * r['utt10']:.2f} | {1e3 * r['utt100']:.2f} | {r['utt100'] / r['utt10']:.2f} | "
              f"{r['create']:.3f} | {r['stream']:.3f} | {r['offline']:.3f} | {r['stream'] / r['offline']:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
