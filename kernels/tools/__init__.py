"""Measuring instruments of the kernels, outside the ops' import path: ``python -m kernels.tools.report`` (static
report of the compiled kernels, no GPU needed) and ``python -m kernels.tools.counts`` (passes over memory and FLOPs counted
in Triton's interpreter)."""
