"""Streaming a live conversation through a trained model, one utterance at a time, for both CARN and CaM-HG.

    model.eval()
    stream = model.stream()                      # one live conversation
    probs = stream.push(audio=a, text=t, speaker=0)   # (C,) class probabilities at this utterance; video missing
    stream = model.stream(batch_size=64)         # 64 live conversations advancing together
    probs = stream.push(audio=A, text=T, video=V, speaker=S, present=P, active=R)   # (64, C)

A stream keeps, per attention layer, the keys and values of the utterances seen so far (:class:`KVCache`), so an
utterance costs attention work proportional to the history, not a re-run of the dialogue. Caches grow by doubling.
Rows of a batched stream are independent conversations of their own lengths (ragged caches): ``active`` says which
rows receive an utterance in a call (the others keep their state), :meth:`ModelStream.reset` starts new
conversations in given rows.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mer.dialogues import MODALITIES

MODALITY_NAMES = {"a": "audio", "t": "text", "v": "video"}


class KVCache:
    """Keys and values of one attention layer for B streams: k (B, H, capacity, D), v (B, H, capacity, Dv).

    ``per_utterance`` positions per utterance (3 for CaM-HG's hypergraph nodes, 1 elsewhere); stream b's cache holds
    ``per_utterance * length_b`` positions (the stream's lengths)."""

    def __init__(self, per_utterance: int = 1):
        self.per_utterance = per_utterance
        self.k = self.v = None

    def reserve(self, k: torch.Tensor, v: torch.Tensor, utterances: int) -> None:
        """Room for ``utterances`` utterances per stream, allocated like ``k`` (B, H, Tq, D) and ``v``."""
        needed = utterances * self.per_utterance
        if self.k is not None and self.k.shape[2] >= needed:
            return
        capacity = max(needed, 2 * (0 if self.k is None else self.k.shape[2]), 16 * self.per_utterance)
        grown = []
        for old, new in ((self.k, k), (self.v, v)):
            cache = new.new_zeros(new.shape[0], new.shape[1], capacity, new.shape[3])
            if old is not None:
                cache[:, :, :old.shape[2]] = old
            grown.append(cache)
        self.k, self.v = grown


class ModelStream:
    """The state of B live conversations through one model (eval mode, no gradients).

    ``push(audio=None, text=None, video=None, speaker=None, *, present=None, active=None, probabilities=True)``:
    one utterance for each active row. Each modality is None (missing for every row) or a (B, d_m) tensor ((d_m,)
    when B = 1); ``present`` (B, 3) bool marks per row which modalities are observed (default: those given; a
    modality not given must be False); ``speaker`` an int or (B,) ints in {0, 1} (default 0; CARN ignores it);
    ``active`` (B,) bool, the rows that advance (default all). Returns the prediction at this utterance: (B, C)
    class probabilities (the logits with ``probabilities=False``), or (B,) sentiment scores for a score model;
    without the batch axis when the inputs had none. Rows that are not active return their last output's shape
    with unspecified values.

    Subclasses implement ``_step(features {m: (B, 1, d_m)}, present (B, 3), speakers (B,), active (B,)) -> (B, C)``
    logits or (B,) scores, with ``self.lengths`` (B,) int32 the utterances each row has seen before this one.
    """

    def __init__(self, model: nn.Module, dims: dict[str, int], batch_size: int, predicts_score: bool):
        if model.training:
            raise ValueError("the model is in training mode: call model.eval() before model.stream() (dropout would "
                             "make the streamed predictions random)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.dims, self.batch_size, self.predicts_score = model, dict(dims), batch_size, predicts_score
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        self.every_row = torch.ones(batch_size, dtype=torch.bool, device=self.device)  # ``active`` by default
        self.max_length = 0  # host copy of lengths.max(): sizes the caches without a device sync

    def reset(self, rows: Optional[torch.Tensor] = None) -> None:
        """Start new (empty) conversations in ``rows`` ((B,) bool or indices; None: every row)."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(rows, device=self.device)] = 0
        self.max_length = int(self.lengths.max())

    @torch.inference_mode()
    def push(self, audio=None, text=None, video=None, speaker=None, *, present=None, active=None,
             probabilities: bool = True) -> torch.Tensor:
        given = {"a": audio, "t": text, "v": video}
        unbatched = any(x is not None and torch.as_tensor(x).dim() == 1 for x in given.values())
        if unbatched and self.batch_size != 1:
            raise ValueError(f"this stream has batch_size {self.batch_size}: give (B, d_m) features, not (d_m,)")
        b = self.batch_size
        features = {}
        for m, x in given.items():
            name = MODALITY_NAMES[m]
            if x is None:
                features[m] = torch.zeros(b, 1, self.dims[m], dtype=self.dtype, device=self.device)
                continue
            x = torch.as_tensor(x, device=self.device)
            if not x.is_floating_point():
                raise TypeError(f"{name} must be floating-point features, got {x.dtype}")
            x = x.reshape(1, -1) if x.dim() == 1 else x
            if tuple(x.shape) != (b, self.dims[m]):
                raise ValueError(f"{name} must have shape (B, d) = {(b, self.dims[m])}, got {tuple(x.shape)}")
            features[m] = x.to(self.dtype)[:, None]
        observed = torch.tensor([given[m] is not None for m in MODALITIES], device=self.device)
        every_row, every_given = active is None, present is None  # no row or given modality left out
        if present is None:
            present = observed.expand(b, len(MODALITIES))
        else:
            present = torch.as_tensor(present, device=self.device).reshape(b, len(MODALITIES))
            if present.dtype != torch.bool:
                raise TypeError(f"present must be a bool tensor, got {present.dtype}")
            if (present & ~observed).any():
                raise ValueError("present marks a modality observed that was not given (None)")
        active = self.every_row if every_row else torch.as_tensor(active, device=self.device).reshape(b)
        if active.dtype != torch.bool:
            raise TypeError(f"active must be a (B,) bool tensor, got {active.dtype}")
        speakers = torch.as_tensor(0 if speaker is None else speaker, device=self.device).reshape(-1).expand(b)
        if speakers.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"speaker must be integer ids, got {speakers.dtype}")
        # the value checks, one host sync for all: a (B, 5) table of failures, columns in ``messages`` order (the
        # row and the message are looked up only on failure)
        finite = torch.stack([torch.isfinite(features[m][:, 0]).all(dim=-1) for m in MODALITIES], dim=-1)
        failures = torch.cat([present & ~finite, ~present.any(dim=-1, keepdim=True),
                              ((speakers < 0) | (speakers > 1))[:, None]], dim=-1)
        failures = failures if every_row else failures & active[:, None]
        if bool(failures.any()):
            messages = [f"{MODALITY_NAMES[m]} holds NaN or inf values at row" for m in MODALITIES] + [
                "an active row has no modality present (at least one is needed per utterance): row",
                "speaker must be 0 or 1, got another value at row"]
            row, column = (int(i) for i in failures.t().nonzero()[0].flip(0))
            raise ValueError(f"{messages[column]} {row}")
        # rows not active get zeros: what they write past their cache length stays finite (it is overwritten later);
        # modalities not given are zeros already
        if not (every_row and every_given):
            seen = present & active[:, None]
            features = {m: features[m].masked_fill(~seen[:, i, None, None], 0.0) for i, m in enumerate(MODALITIES)}
        outputs = self._step(features, present, speakers.long(), active)
        self.lengths += 1 if every_row else active.to(torch.int32)
        self.max_length += 1  # an upper bound; exact once reset() recounts
        if probabilities and not self.predicts_score:
            outputs = outputs.float().softmax(dim=-1)
        return outputs[0] if unbatched else outputs

    def _step(self, features, present, speakers, active) -> torch.Tensor:
        raise NotImplementedError

    # --------------------------------------------------------------------------------- helpers of the steps
    def new_cache(self, per_utterance: int = 1) -> KVCache:
        return KVCache(per_utterance)

    def cache_arguments(self, cache: KVCache, k: torch.Tensor, v: torch.Tensor,
                        lengths: Optional[torch.Tensor] = None) -> tuple:
        """(k_cache, v_cache, cache_seqlens) for a ``kernels.*_with_kvcache`` call writing ``k``/``v`` (the new
        positions) at each row's length (``lengths``: the rows' cache lengths, default ``self.lengths`` times the
        positions per utterance), the cache grown first when needed. The caches given are views of the positions
        the longest row holds after the call: attention costs the history, not the cache's capacity."""
        cache.reserve(k, v, self.max_length + 1)
        attended = (self.max_length + 1) * cache.per_utterance
        if lengths is None:
            lengths = self.lengths if cache.per_utterance == 1 else self.lengths * cache.per_utterance
        return cache.k.narrow(2, 0, attended), cache.v.narrow(2, 0, attended), lengths


class StreamLinear:
    """``nn.functional.linear(x, weight, bias)`` on the weights taken when the stream is created, for the ``rows``
    rows (utterances x positions) of one step: x (..., in) -> (..., out).

    On the CPU in float32 a step is bound by reading the weights, and the layout decides the rate
    (``bench/stream_latency.py``'s docstring has the numbers): a map of more than one row runs on oneDNN with the
    weight packed once here (MKL's GEMM reads 3 rows' weights at about half its 1-row rate, oneDNN's packed GEMM at
    about 3/4 of it); a 1-row map wider than it is deep (out > in) multiplies by a transposed copy, (in, out)
    contiguous, which MKL's GEMV streams about 1.5x faster than the (out, in) weight. Other devices and dtypes:
    ``F.linear``."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: int):
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.packed = self.transposed = None
        cpu_float32 = self.weight.device.type == "cpu" and self.weight.dtype == torch.float32
        if rows > 1 and cpu_float32 and _onednn_linear():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows)
        elif rows == 1 and cpu_float32 and self.weight.shape[0] > self.weight.shape[1]:
            self.transposed = self.weight.t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.transposed is not None:
            rows = x.reshape(-1, x.shape[-1])
            y = torch.mm(rows, self.transposed) if self.bias is None else torch.addmm(self.bias, rows, self.transposed)
            return y.view(*x.shape[:-1], y.shape[-1])
        return nn.functional.linear(x, self.weight, self.bias)


def _onednn_linear() -> bool:
    """Whether this PyTorch build runs CPU linear maps with oneDNN's packed weights."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, E) -> (B, heads, T, E / heads)."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, Dh) -> (B, T, heads * Dh)."""
    return x.transpose(1, 2).flatten(-2)


def in_projections(weight: torch.Tensor, bias: Optional[torch.Tensor], query: torch.Tensor,
                   context: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of a packed (3E, E) in-projection (``nn.MultiheadAttention``'s layout), each (B, T, E): q from
    ``query``, k and v from ``context`` (None: self-attention, one matrix product for the three)."""
    if context is None:
        return nn.functional.linear(query, weight, bias).chunk(3, dim=-1)
    w_q, w_kv = weight.split([weight.shape[0] // 3, 2 * weight.shape[0] // 3])
    b_q, b_kv = bias.split([w_q.shape[0], w_kv.shape[0]]) if bias is not None else (None, None)
    return (nn.functional.linear(query, w_q, b_q), *nn.functional.linear(context, w_kv, b_kv).chunk(2, dim=-1))
