"""Sparse decoding: x̂ = Σ_j values[n, j] · W_dec[indices[n, j]] without a dense [N, d_sae] @ W_dec.

A TopK SAE has k ≪ d_sae active latents per row, so the dense product wastes d_sae / k of its work
in the forward pass and again in both backward products. embedding_bag gathers and sums exactly the
k active decoder rows, and its backward scatters into those rows only (and gives the per-sample
weights, i.e. the latent values, their gradient <grad_out[n], W_dec[indices[n, j]]>).
"""

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
