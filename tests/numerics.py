"""How far two correct fp32 computations of the same activations may differ, from the numerics alone.

A different kernel (torch.compile's fused ones, another CPU's vector width, another thread count) sums
the same products in another order. For a dot product of length n each order is within gamma_n * sum|a_i b_i|
of the exact value (gamma_n ~ n * u, u = 2**-24 the unit roundoff of fp32), so two orders are within
2 * n * u of each other relative to the size of the terms; a forward through `depth` such reductions in
a row (matmuls, norms) compounds that at most `depth` times. The bound is scaled by the largest activation,
which bounds sum|a_i b_i| / n for the normalised stacks compared here. It holds on any CPU, and a real
mistake (a wrong position, a dropped term) is orders of magnitude above it.
"""

import torch

UNIT_ROUNDOFF = 2.0**-24  # fp32


def reorder_atol(reference: torch.Tensor, reduction_length: int, depth: int) -> float:
    """Absolute tolerance between two summation orders of the computation that gave `reference`."""
    return 2.0 * depth * reduction_length * UNIT_ROUNDOFF * float(reference.abs().max())


def assert_close_reordered(got: torch.Tensor, want: torch.Tensor, reduction_length: int, depth: int) -> None:
    torch.testing.assert_close(got, want, rtol=0.0, atol=reorder_atol(want, reduction_length, depth))
