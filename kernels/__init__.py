"""Fused Triton kernels for CARN and CaM-HG: alpha-entmax attention, block-causal attention, top-2 MoE.

Every op dispatches on ``KERNELS_BACKEND`` (see ``kernels.backend``); ``kernels.reference`` holds the
plain PyTorch references and the reference twins of the modules.
"""
from . import reference
from ._version import __version__
from .backend import use_backend
from .block_causal import (
    BlockCausalMultiheadAttention,
    BlockCausalTransformerLayer,
    block_causal_attention,
)
from .entmax import (FusedEntmaxCausalAttention, alpha_entmax, entmax15_attention, entmax_attention,
                     entmax_attention_varlen)
from .kvcache import block_causal_attention_with_kvcache, entmax_attention_with_kvcache
from .moe import Top2MoE, moe_top2

__all__ = [
    "__version__",
    "BlockCausalMultiheadAttention",
    "BlockCausalTransformerLayer",
    "FusedEntmaxCausalAttention",
    "Top2MoE",
    "alpha_entmax",
    "block_causal_attention",
    "block_causal_attention_with_kvcache",
    "entmax15_attention",
    "entmax_attention",
    "entmax_attention_varlen",
    "entmax_attention_with_kvcache",
    "moe_top2",
    "reference",
    "use_backend",
]
