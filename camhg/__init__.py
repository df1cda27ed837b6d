"""CaM-HG (Causal-Enhanced MoE and Hypergraph Network) on the package's fused ops: model, training, evaluation.

``python -m camhg.train`` trains and evaluates on the embedded dataset; ``python -m camhg.evaluate CHECKPOINT``
re-evaluates a saved run; ``python -m camhg.ablations`` runs the paper's Table 4 sweep.
"""
from .config import ABLATIONS, PRESETS, CaMHGConfig, preset
from .model import CaMHG, CaMHGOutput

__all__ = ["ABLATIONS", "PRESETS", "CaMHG", "CaMHGConfig", "CaMHGOutput", "preset"]
