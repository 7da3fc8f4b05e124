"""Sparse decoding: x̂ = Σ_j values[n, j] · W_dec[indices[n, j]] without a dense [N, d_sae] @ W_dec.

A TopK SAE has k ≪ d_sae active latents per row, so the dense product wastes d_sae / k of its work
in the forward pass and again in both backward products. embedding_bag gathers and sums exactly the
k active decoder rows, and its backward scatters into those rows only (and gives the per-sample
weights, i.e. the latent values, their gradient <grad_out[n], W_dec[indices[n, j]]>).
"""

import math
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


def sparse_decode_ragged(values: torch.Tensor, columns: torch.Tensor, offsets: torch.Tensor,
                         W_dec: torch.Tensor) -> torch.Tensor:
    """Rows with different numbers of active latents (BatchTopK): flat values/columns,
    row n = [offsets[n], offsets[n+1])."""
    return F.embedding_bag(columns, W_dec, offsets, per_sample_weights=values.to(W_dec.dtype), mode="sum")


class _GatherEncode(torch.autograd.Function):
    """values = (x − b_dec) · W_enc[:, columns] + b_enc[columns] at chosen entries, read from precomputed
    pre-activations (x_c = x − b_dec, or x when the SAE does not subtract b_dec: b_dec is None then).

    Autograd through a dense `x_c @ W_enc` then topk spends two dense [N, d_in] x [d_in, d_sae] products
    and several dense [N, d_sae] gradient buffers on a gradient that is non-zero in only m entries per row.
    This backward touches those entries only: the W_enc gradient is an embedding_bag weight gradient
    (row columns[j] of W_encᵀ gets g[j] · x_c[row of j]); b_enc's is s, the per-column sum of g; and
    b_dec's is −W_enc · s (each chosen entry's pre-activation moves by −W_enc[:, column] with b_dec), one
    product with W_enc in place of a per-token gradient of x_c. x_c itself (data) gets none.

    Padded layout (TopK): columns [N, m], one row per token (offsets None). Ragged layout (BatchTopK):
    flat rows/columns [M] sorted by row, row n's entries at [offsets[n], offsets[n+1]).
    """

    @staticmethod
    def forward(ctx, pre, x_c, W_enc, b_enc, b_dec, columns, rows, offsets):
        ctx.save_for_backward(x_c, W_enc, columns, offsets)
        return pre.gather(1, columns) if rows is None else pre[rows, columns]

    @staticmethod
    def backward(ctx, grad):
        x_c, W_enc, columns, offsets = ctx.saved_tensors
        weights = grad.to(W_enc.dtype)
        grad_W = grad_b = grad_shift = None
        if ctx.needs_input_grad[2]:
            with torch.enable_grad():  # the weight gradient of embedding_bag is exactly this scatter of outer products
                table = torch.zeros(W_enc.shape[1], W_enc.shape[0], dtype=W_enc.dtype, device=W_enc.device,
                                    requires_grad=True)
                bags = F.embedding_bag(columns, table, offsets, per_sample_weights=weights, mode="sum")
                (grad_W,) = torch.autograd.grad(bags, table, grad_outputs=x_c.to(W_enc.dtype))
            grad_W = grad_W.t()
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            sums = torch.zeros(W_enc.shape[1], dtype=W_enc.dtype,
                               device=grad.device).index_add_(0, columns.flatten(), weights.flatten())
            grad_b = sums if ctx.needs_input_grad[3] else None
            grad_shift = -(W_enc @ sums) if ctx.needs_input_grad[4] else None
        return None, None, grad_W, grad_b, grad_shift, None, None, None


def gather_encode(pre: torch.Tensor, x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, indices: torch.Tensor,
                  b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """Pre-activations at `indices` [N, m] with gradients to W_enc, b_enc and b_dec as if pre = x_c @ W_enc + b_enc
    with x_c = x − b_dec (pass b_dec=None when x_c is x itself; x_c gets no gradient either way).

    `pre` must be that product, computed without autograd (torch.no_grad): the forward only gathers it.
    """
    return _GatherEncode.apply(pre.detach(), x_c.detach(), W_enc, b_enc, b_dec, indices, None, None)


def gather_encode_ragged(pre, x_c, W_enc, b_enc, rows: torch.Tensor, columns: torch.Tensor, offsets: torch.Tensor,
                         b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """gather_encode for a ragged selection: pre[rows, columns] ([M], rows sorted, `offsets` [N]
    where each row starts)."""
    return _GatherEncode.apply(pre.detach(), x_c.detach(), W_enc, b_enc, b_dec, columns, rows, offsets)


def batch_topk_ragged(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k·N largest entries of pre [N, d_sae] across the whole batch as row-sorted (rows, columns, offsets).

    No dense latents; offsets come from a binary search of the sorted rows (no host sync on CUDA).
    """
    n, d_sae = pre.shape
    flat = _top_flat_indices(pre, min(k * n, pre.numel()))
    rows, columns = flat // d_sae, flat % d_sae
    offsets = torch.searchsorted(rows, torch.arange(n, device=pre.device, dtype=rows.dtype))
    return rows, columns, offsets


def _top_flat_indices(pre: torch.Tensor, n_keep: int, stride: int = 16, margin: float = 1.25) -> torch.Tensor:
    """Sorted flat indices of the n_keep largest entries of pre [N, d_sae].

    On CPU a topk over all N·d_sae values is the slowest part of a BatchTopK step. A threshold taken
    from every stride-th row (the value that would keep margin × the expected share there) narrows the
    search to the entries above it; when at least n_keep are, the top n_keep are all among them, so
    the result is exact; when fewer are (a sample that missed), the full topk runs. On CUDA the full
    topk is fast and the check would need a host sync, so it always runs.
    """
    flat = pre.reshape(-1)
    sample = pre[::stride].reshape(-1)
    sample_keep = math.ceil(n_keep * sample.numel() / flat.numel() * margin)
    if not pre.is_cuda and 0 < sample_keep < sample.numel():
        cut = sample.topk(sample_keep, sorted=False).values.min()
        candidates = (flat > cut).nonzero().squeeze(1)  # sorted
        if candidates.numel() >= n_keep:
            return candidates[flat[candidates].topk(n_keep, sorted=False).indices.sort().values]
    return flat.topk(n_keep, sorted=False).indices.sort().values


class SparseLatents(NamedTuple):
    """Latents of a sparse SAE without the dense [N, d_sae] tensor (zero values allowed: they do not fire).

    Padded (TopK): values/indices [N, m], one row per token. Ragged (BatchTopK, a count per token that
    varies): flat values/indices [M] with the token of each entry in `rows` and the token count in `n_rows`.
    """

    values: torch.Tensor
    indices: torch.Tensor
    d_sae: int
    rows: torch.Tensor | None = None
    n_rows: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.values.shape[0] if self.rows is None else self.n_rows, self.d_sae)

    def detach(self) -> "SparseLatents":
        return self._replace(values=self.values.detach())

    def dense(self) -> torch.Tensor:
        if self.rows is None:
            return to_dense(self.values, self.indices, self.d_sae)
        out = self.values.new_zeros(self.shape)
        return out.index_put((self.rows, self.indices), self.values, accumulate=True)

    def firing_counts(self) -> torch.Tensor:
        """Tokens in which each latent is non-zero ([d_sae], float64); no host sync."""
        fired = (self.values != 0).flatten().to(torch.float64)
        # index_add, not bincount: bincount on CUDA reads the largest index back to the host
        return fired.new_zeros(self.d_sae).index_add_(0, self.indices.flatten(), fired)
