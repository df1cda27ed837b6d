"""Maximum |error| of causal entmax-1.5 attention against ``entmax.entmax15`` in float64, for ours and for AdaSplash
at its defaults (the aim: ours smaller). Needs a CUDA GPU.

    python bench/accuracy_entmax.py [--dtype bfloat16 float16 float32] [--seeds 3] [--json rows.json]

For each dtype, shape and seed: random q, k, v (N(0, 1)) in that dtype; the truth is ``entmax15(q k^T / sqrt(D)) @ v``
computed in float64 from the same rounded inputs. Prints max |out - truth| and max |d(q, k, v) - truth| (the gradient
of ``sum(out * g)`` for a random g) per candidate; ``--json`` rewrites the rows to a file after every shape, so that
a run cut short keeps what it measured. AdaSplash scales scores by D ** -0.5 like us (its own tests' reference does);
it is called as ``adasplash(q, k, v, is_causal=True)``, every other argument at its default. ``--dry-run`` runs one
tiny shape on the CPU with our op on its reference backend: it checks the script and measures nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import entmax15_attention, reference, use_backend  # noqa: E402

#: (B, H, T, D): power-of-two T and D so that AdaSplash runs too
SHAPES = [(4, 8, 128, 64), (2, 8, 1024, 64), (1, 8, 4096, 128)]
DRY_RUN_SHAPES = [(1, 2, 32, 16)]


def _ours(backend):
    def run(q, k, v):
        with use_backend(backend):
            return entmax15_attention(q, k, v)

    return run


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


def _worst_errors(candidates, shape, dtype, seeds, device):
    """{candidate: (max output error, max gradient error)} over the seeds."""
    worst = {name: [0.0, 0.0] for name in candidates}
    for seed in range(seeds):
        generator = torch.Generator(device=device).manual_seed(seed)
        q, k, v, g = (torch.randn(*shape, device=device, generator=generator).to(dtype) for _ in range(4))
        leaves = [x.double().requires_grad_() for x in (q, k, v)]
        truth = reference.entmax15_attention_reference(*leaves)
        truth.backward(g.double())
        truth_grads = [x.grad for x in leaves]
        for name, fn in candidates.items():
            forward, backward = _errors(fn, q, k, v, g, truth.detach(), truth_grads)
            worst[name] = [max(worst[name][0], forward), max(worst[name][1], backward)]
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", help="write the rows (and the machine) to this file after every shape")
    parser.add_argument("--dry-run", action="store_true",
                        help="one tiny shape on the CPU, ours on the reference backend: checks the script only")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (--dry-run checks the script on a CPU)")
    device = "cpu" if args.dry_run else "cuda"
    candidates = {"ours": _ours("reference" if args.dry_run else "triton")}
    notes = []
    if args.dry_run:
        notes.append("dry run: CPU, ours on the reference backend; measures nothing")
    else:
        try:
            import adasplash  # noqa: F401

            candidates["adasplash"] = _adasplash
        except ImportError as error:
            notes.append(f"adasplash not installed ({error}): ours only")
    machine = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device {machine}, torch {torch.__version__}" + "".join(f"; {note}" for note in notes))
    print(f"{'dtype':>9} {'shape':>22} {'candidate':>10} {'max |out err|':>14} {'max |grad err|':>15}")
    rows = []
    for dtype_name in args.dtype:
        for shape in DRY_RUN_SHAPES if args.dry_run else SHAPES:
            worst = _worst_errors(candidates, shape, getattr(torch, dtype_name), args.seeds, device)
            for name, (forward, backward) in worst.items():
                label = "B{}-H{}-T{}-D{}".format(*shape)
                print(f"{dtype_name:>9} {label:>22} {name:>10} {forward:14.3e} {backward:15.3e}")
                rows.append({"dtype": dtype_name, "shape": label, "candidate": name, "seeds": args.seeds,
                             "max_abs_error_output": forward, "max_abs_error_gradients": backward})
            if args.json:
                with open(args.json, "w", encoding="utf-8") as file:
                    json.dump({"device": machine, "torch": torch.__version__, "notes": notes, "rows": rows}, file,
                              indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
