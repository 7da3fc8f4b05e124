"""Sparse decoding: x̂ = Σ_j values[n, j] · W_dec[indices[n, j]] without a dense [N, d_sae] @ W_dec.

A TopK SAE has k ≪ d_sae active latents per row, so the dense product wastes d_sae / k of its work
in the forward pass and again in both backward products. embedding_bag gathers and sums exactly the
k active decoder rows, and its backward scatters into those rows only (and gives the per-sample
weights, i.e. the latent values, their gradient <grad_out[n], W_dec[indices[n, j]]>).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Σ_j values[n, j] · W_dec[indices[n, j]] for values/indices [N, m] -> [N, d_in].

    Padding entries must carry value 0 (any valid index): they add nothing and get no gradient weight.
    """
    if values.shape != indices.shape or values.dim() != 2:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be [N, m]")
    if values.shape[1] == 0:  # no active latent in the whole batch
        return values.new_zeros(values.shape[0], W_dec.shape[1]) + 0.0 * W_dec.sum()
    # embedding_bag wants the weights in W_dec's dtype (autocast may hand us another)
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


def dense_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """The same sum as a dense [N, d_sae] @ W_dec: the reference that tests and benchmarks compare with."""
    dense = values.new_zeros(values.shape[0], W_dec.shape[0]).scatter_add(1, indices, values)
    return dense @ W_dec


def topk_sparse(pre_acts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest pre-activations per row, after ReLU (so a negative one in the top k gives 0)."""
    values, indices = pre_acts.topk(k, dim=-1, sorted=False)
    return values.relu(), indices


def dense_to_sparse(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nonzero latents per row as (values, indices) [N, m], m = the largest count in the batch.

    Rows with fewer nonzeros are padded with value 0 (the padding's indices point at zero latents).
    """
    m = int((latents != 0).sum(dim=-1).max().item()) if latents.numel() else 0
    values, indices = latents.abs().topk(m, dim=-1)
    return latents.gather(-1, indices), indices


def to_dense(values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> torch.Tensor:
    """Scatter (values, indices) [N, m] into dense latents [N, d_sae] (keeps the gradient to values)."""
    return values.new_zeros(values.shape[0], d_sae).scatter_add(1, indices, values)


def sparse_decode_ragged(values: torch.Tensor, columns: torch.Tensor, offsets: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Rows with different numbers of active latents (BatchTopK): flat values/columns, row n = [offsets[n], offsets[n+1])."""
    return F.embedding_bag(columns, W_dec, offsets, per_sample_weights=values.to(W_dec.dtype), mode="sum")


def dense_to_ragged(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nonzero latents of [N, d_sae] as flat (values, columns, offsets) in row-major order, for sparse_decode_ragged."""
    rows, columns = latents.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=latents.shape[0])
    offsets = torch.cumsum(counts, 0) - counts
    return latents[rows, columns], columns, offsets


class _GatherEncode(torch.autograd.Function):
    """values[n, j] = x_c[n] · W_enc[:, indices[n, j]] + b_enc[indices[n, j]], read from precomputed pre-activations.

    Autograd through a dense `x_c @ W_enc` then topk spends two dense [N, d_in] x [d_in, d_sae] products
    and several dense [N, d_sae] gradient buffers on a gradient that is non-zero in only m entries per row.
    This backward touches those entries only: the W_enc gradient is an embedding_bag weight gradient
    (row indices[n, j] of W_encᵀ gets g[n, j] · x_c[n]), the x_c gradient a sparse decode against W_encᵀ.
    """

    @staticmethod
    def forward(ctx, pre, x_c, W_enc, b_enc, indices):
        ctx.save_for_backward(x_c, W_enc, indices)
        return pre.gather(1, indices)

    @staticmethod
    def backward(ctx, grad):
        x_c, W_enc, indices = ctx.saved_tensors
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_x = F.embedding_bag(indices, W_enc.t().contiguous(), per_sample_weights=grad.to(W_enc.dtype), mode="sum")
        if ctx.needs_input_grad[2]:
            with torch.enable_grad():  # the weight gradient of embedding_bag is exactly this scatter of outer products
                table = torch.zeros(W_enc.shape[1], W_enc.shape[0], dtype=W_enc.dtype, device=W_enc.device, requires_grad=True)
                bags = F.embedding_bag(indices, table, per_sample_weights=grad.to(W_enc.dtype), mode="sum")
                (grad_W,) = torch.autograd.grad(bags, table, grad_outputs=x_c.to(W_enc.dtype))
            grad_W = grad_W.t()
        if ctx.needs_input_grad[3]:
            grad_b = torch.zeros(W_enc.shape[1], dtype=grad.dtype, device=grad.device).index_add_(0, indices.flatten(), grad.flatten())
        return None, grad_x, grad_W, grad_b, None


def gather_encode(pre: torch.Tensor, x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Pre-activations at `indices` [N, m] with gradients to x_c, W_enc, b_enc as if pre = x_c @ W_enc + b_enc.

    `pre` must be that product, computed without autograd (torch.no_grad): the forward only gathers it.
    """
    return _GatherEncode.apply(pre.detach(), x_c, W_enc, b_enc, indices)


class SparseLatents(NamedTuple):
    """Latents of a k-sparse SAE as (values, indices) [N, m] (zeros allowed), without the dense [N, d_sae] tensor."""

    values: torch.Tensor
    indices: torch.Tensor
    d_sae: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.values.shape[0], self.d_sae)

    def detach(self) -> "SparseLatents":
        return SparseLatents(self.values.detach(), self.indices, self.d_sae)

    def dense(self) -> torch.Tensor:
        return to_dense(self.values, self.indices, self.d_sae)

    def firing_counts(self) -> torch.Tensor:
        """Tokens in which each latent is non-zero ([d_sae], float64); no host sync."""
        fired = (self.values != 0).flatten().to(torch.float64)
        return torch.bincount(self.indices.flatten(), weights=fired, minlength=self.d_sae)
