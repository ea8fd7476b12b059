"""Screens: matrix products in fp32, tf32, bf16 or fp16, with a rigorous bound on their error.

Tensor cores multiply several times faster in reduced precision, but a reduced-precision dot
product can move a decision near a threshold. The stages that use them (dedup's similarity
tiles, the cluster assignment on GPUs) treat every product as a screen: `screen_bound` bounds
its error from the precision and the dimension, and every decision within that bound of its
threshold is recomputed exactly. Decisions are then the exact ones at any precision.
"""

from __future__ import annotations

import math

# Worst-case relative errors of each screen: (inputs converted to, output converted to). They
# allow for truncation, not only round-to-nearest: tensor cores may truncate when they convert
# to tf32 and when they accumulate (Fasi, Higham, Mikaitis and Pranesh, 2021), so each is one
# unit in the last place, twice the unit roundoff. Products of two inputs of these formats are
# exact in fp32, where they are summed.
PRECISIONS = {
    "fp32": (0.0, 0.0),
    "tf32": (2.0**-10, 0.0),  # 10-bit mantissas in, fp32 out
    "bf16": (2.0**-7, 2.0**-7),  # 7-bit mantissas in and out
    "fp16": (2.0**-10, 2.0**-10),  # 10-bit mantissas in and out
}
SUM_ERROR = 2.0**-23  # per fp32 addition, truncating or not
SUBNORMAL = {"fp32": 0.0, "tf32": 2.0**-149, "bf16": 2.0**-133, "fp16": 2.0**-24}


def screen_bound(precision: str, dim: int) -> float:
    """A rigorous bound on |screened dot - exact dot| for two unit float32 vectors of `dim`.

    With inputs converted with relative error at most u (and below the format's subnormal
    spacing s at most s absolutely), sums in fp32 with error at most v = 2^-23 each (gamma_d =
    d v / (1 - d v), any order, FMA or not, truncating or not) and the output converted with
    relative error at most w: the inputs contribute (2u + u^2) sum|x_i y_i| <= 2u + u^2
    (Cauchy-Schwarz) plus 2 sqrt(d) s for subnormals, the sum gamma_d (1 + u)^2, the output w
    times the result's magnitude (at most 1 + the rest). The bound only decides which pairs
    are rechecked, never a decision; 1% on top covers the arithmetic of the bound."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    u, w = PRECISIONS[precision]
    v = SUM_ERROR
    gamma = dim * v / (1 - dim * v)
    inputs = 2 * u + u * u + 2 * math.sqrt(dim) * SUBNORMAL[precision]
    summed = gamma * (1 + u) ** 2
    # The stored vectors' norms are 1 within float32 rounding: allow |x| |y| <= 1 + 1e-6.
    return 1.01 * (1 + 1e-6) * (inputs + summed + w * (1 + inputs + summed))


def screen_dtype(precision: str):
    """The torch dtype a screen's inputs are rounded to (tf32 rounds inside the kernel)."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def screened_matmul(a, b, precision: str):
    """a @ b (torch tensors already in `screen_dtype`) summed in fp32, as screen_bound assumes:
    on CUDA, tf32 only when asked for and no reduced-precision reductions in fp16/bf16."""
    import torch

    if not a.is_cuda:
        return a @ b  # CPU kernels sum bf16 and fp16 products in fp32, and have no tf32
    matmul = torch.backends.cuda.matmul
    names = (
        "allow_tf32",
        "allow_fp16_reduced_precision_reduction",
        "allow_bf16_reduced_precision_reduction",
    )
    previous = {name: getattr(matmul, name) for name in names}
    try:
        matmul.allow_tf32 = precision == "tf32"
        matmul.allow_fp16_reduced_precision_reduction = False
        matmul.allow_bf16_reduced_precision_reduction = False
        return a @ b
    finally:
        for name, value in previous.items():
            setattr(matmul, name, value)
