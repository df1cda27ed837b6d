"""Maximum |error| of causal entmax-1.5 attention against ``entmax.entmax15`` in float64, for ours and for AdaSplash
at its defaults (issue 2 asks that ours be smaller). Needs a CUDA GPU.

    python bench/accuracy_entmax.py [--dtype bfloat16] [--seeds 3]

For each shape and seed: random q, k, v (N(0, 1)) in ``--dtype``; the truth is ``entmax15(q k^T / sqrt(D)) @ v``
computed in float64 from the same rounded inputs. Prints max |out - truth| and max |d(q, k, v) - truth| (the gradient
of ``sum(out * g)`` for a random g) per candidate. AdaSplash scales scores by D ** -0.5 like us (its own tests'
reference does); it is called as ``adasplash(q, k, v, is_causal=True)``, every other argument at its default.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import entmax15_attention, reference, use_backend  # noqa: E402

#: (B, H, T, D): power-of-two T and D so that AdaSplash runs too
SHAPES = [(4, 8, 128, 64), (2, 8, 1024, 64), (1, 8, 4096, 128)]


def _ours(q, k, v):
    with use_backend("triton"):
        return entmax15_attention(q, k, v)


def _adasplash(q, k, v):
    from adasplash import adasplash

    return adasplash(q, k, v, is_causal=True)


def _errors(fn, q, k, v, g, truth, truth_grads):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(g)
    forward = (out.double() - truth).abs().max().item()
    backward = max((x.grad.double() - t).abs().max().item() for x, t in zip(leaves, truth_grads))
    return forward, backward


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    candidates = {"ours": _ours}
    try:
        import adasplash  # noqa: F401

        candidates["adasplash"] = _adasplash
    except ImportError:
        print("adasplash is not installed: reporting ours only")
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, dtype {args.dtype}")
    print(f"{'shape':>22} {'candidate':>10} {'max |out err|':>14} {'max |grad err|':>15}")
    for shape in SHAPES:
        worst = {name: [0.0, 0.0] for name in candidates}
        for seed in range(args.seeds):
            generator = torch.Generator(device="cuda").manual_seed(seed)
            q, k, v, g = (torch.randn(*shape, device="cuda", generator=generator).to(dtype) for _ in range(4))
            leaves = [x.double().requires_grad_() for x in (q, k, v)]
            truth = reference.entmax15_attention_reference(*leaves)
            truth.backward(g.double())
            truth_grads = [x.grad for x in leaves]
            for name, fn in candidates.items():
                forward, backward = _errors(fn, q, k, v, g, truth.detach(), truth_grads)
                worst[name] = [max(worst[name][0], forward), max(worst[name][1], backward)]
        for name, (forward, backward) in worst.items():
            print(f"{'B{}-H{}-T{}-D{}'.format(*shape):>22} {name:>10} {forward:14.3e} {backward:15.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
