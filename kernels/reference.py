"""The plain PyTorch references of every op and the reference twins of the fused modules.

Each lives beside its Triton kernels in the op's own file; this module gathers them under one name.
"""
from .block_causal import (block_causal_attention_reference, block_causal_attention_varlen_reference,
                           block_causal_mask)
from .entmax import (EntmaxCausalAttention, alpha_entmax, entmax15_attention_reference, entmax_attention_reference,
                     entmax_attention_varlen_reference, entmax_attention_weights)
from .kvcache import block_causal_attention_with_kvcache_reference, entmax_attention_with_kvcache_reference
from .moe import Top2MoEReference as Top2MoE
from .moe import moe_top2_reference

__all__ = [
    "EntmaxCausalAttention",
    "Top2MoE",
    "alpha_entmax",
    "block_causal_attention_reference",
    "block_causal_attention_varlen_reference",
    "block_causal_attention_with_kvcache_reference",
    "block_causal_mask",
    "entmax15_attention_reference",
    "entmax_attention_reference",
    "entmax_attention_varlen_reference",
    "entmax_attention_weights",
    "entmax_attention_with_kvcache_reference",
    "moe_top2_reference",
]
