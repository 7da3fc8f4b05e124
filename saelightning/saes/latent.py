"""Latent parallelism: one SAE's latents split over the n ranks of a latent group.

Rank r holds latents [r·d_sae/n, (r+1)·d_sae/n): those columns of W_enc and entries of b_enc, those rows of W_dec
(and a JumpReLU's thresholds), with their Adam moments and trackers; b_dec is replicated. A step needs:
- the encoder, locally (x_c @ W_enc[:, shard]);
- TopK: each rank's local top k per token, all-gathered (n·k candidates), and the global top k of those (the
  global winners are among the local winners); BatchTopK: the batch-wide threshold, the k·N-th largest of the
  gathered local top k·N;
- the decode: each rank's partial reconstruction from its own winners, summed by one all-reduce.

Every rank of a group computes the same loss from the same x̂. The reduction's backward is therefore the
identity (each rank already holds ∂loss/∂x̂), and b_dec, which reaches every shard's encoder through
x_c = x - b_dec, gets those shards' gradients summed by the backward of `copy_to_shards`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from saelightning.errors import SAELightningError

# the parameters (and per-latent buffers) that index latents, and the axis that does
LATENT_AXES = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "threshold": 0}


@dataclass
class LatentShard:
    """This rank's part of an SAE: latents [offset, offset + d_local) of d_sae, rank `rank` of `size` in `group`."""

    group: object  # a torch.distributed ProcessGroup (None: the default group)
    rank: int
    size: int
    d_sae: int

    def __post_init__(self):
        if self.d_sae % self.size:
            raise SAELightningError(f"d_sae={self.d_sae} does not split into {self.size} equal latent shards; "
                                    f"use a d_sae divisible by the latent-parallel size {self.size}")

    @property
    def d_local(self) -> int:
        return self.d_sae // self.size

    @property
    def offset(self) -> int:
        return self.rank * self.d_local

    def own(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(local indices, 0/1 mask) of global latent indices: the mask is 1 where this rank holds the latent
        (elsewhere the local index is 0, a valid row that a 0 weight leaves untouched)."""
        local = indices - self.offset
        mine = (local >= 0) & (local < self.d_local)
        return torch.where(mine, local, torch.zeros_like(local)), mine


class _SumPartials(torch.autograd.Function):
    """Σ over the group's ranks (one all-reduce); backward the identity (the loss after it is the same on every
    rank, so each rank's gradient is already the whole one)."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToShards(torch.autograd.Function):
    """The identity into each shard's computation; backward sums the shards' gradients (one all-reduce)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def sum_partials(x: torch.Tensor, shard: LatentShard) -> torch.Tensor:
    return _SumPartials.apply(x, shard.group)


def copy_to_shards(x: torch.Tensor, shard: LatentShard) -> torch.Tensor:
    return _CopyToShards.apply(x, shard.group)


def all_gather_cat(t: torch.Tensor, shard: LatentShard, dim: int) -> torch.Tensor:
    """The tensors of every rank of the group concatenated along `dim`, in rank order (no gradient)."""
    parts = [torch.empty_like(t) for _ in range(shard.size)]
    dist.all_gather(parts, t.contiguous(), group=shard.group)
    return torch.cat(parts, dim)


def all_max(value: int, shard: LatentShard) -> int:
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=shard.group)
    return int(t)


@torch.no_grad()
def global_topk(ranking: torch.Tensor, values: torch.Tensor, k: int, shard: LatentShard):
    """The k largest of `ranking` [N, d_sae] per row, held as [N, d_local] shards: (their values, the ranking
    there, global indices) [N, k], the same on every rank. Each rank's candidates are its local top k: no global
    winner is outside them. Communication: 3 tensors of [N, n·min(k, d_local)] (values, ranking, indices)."""
    kk = min(k, ranking.shape[-1])
    local_rank, local_idx = ranking.topk(kk, dim=-1, sorted=False)
    candidates = torch.stack([local_rank, values.gather(-1, local_idx)])  # [2, N, kk]: one gather for both
    gathered = all_gather_cat(candidates, shard, 2)
    indices = all_gather_cat(local_idx + shard.offset, shard, 1)
    top = gathered[0].topk(min(k, gathered.shape[2]), dim=-1, sorted=False).indices
    return gathered[1].gather(1, top), gathered[0].gather(1, top), indices.gather(1, top)


def gather_dense(latents: torch.Tensor, shard: LatentShard) -> torch.Tensor:
    """Dense latents [N, d_sae] from every rank's [N, d_local] (evaluation only: N·d_sae values per rank)."""
    return all_gather_cat(latents.detach(), shard, latents.dim() - 1)


def gather_sparse(values: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor | None, shard: LatentShard):
    """Every rank's own entries (values, global indices, rows for ragged ones) concatenated (padded to the longest
    rank's count with zero values, which count as not firing)."""
    values = values.detach()
    axis = values.dim() - 1
    length = all_max(values.shape[axis], shard)
    pad = length - values.shape[axis]
    if pad:
        shape = list(values.shape)
        shape[axis] = pad
        values = torch.cat([values, values.new_zeros(shape)], axis)
        indices = torch.cat([indices, indices.new_zeros(shape)], axis)
        if rows is not None:
            rows = torch.cat([rows, rows.new_zeros(shape)], axis)
    return (all_gather_cat(values, shard, axis), all_gather_cat(indices, shard, axis),
            None if rows is None else all_gather_cat(rows, shard, axis))


# --- what a step communicates: counted (CollectiveCounter) and predicted (communication_per_step) ---

class CollectiveCounter:
    """Counts the bytes of every torch.distributed all_gather, all_reduce and broadcast called while it is active
    (`with CollectiveCounter() as c: ...`), by wrapping those functions: every call through torch.distributed is
    counted as it happens (DDP's gradient all-reduce, which its C++ reducer makes, is not).

    `gathered`: bytes this rank receives from all-gathers ((size - 1) x its own input); `reduced`: bytes this rank
    puts into all-reduces (its tensor's size); `broadcast`: bytes of broadcasts; `calls`: (op, dtype, shape, group
    size) per call. Collectives over a group of one rank move nothing and are not counted."""

    _OPS = ("all_gather", "all_reduce", "broadcast")

    def __init__(self):
        self.gathered = self.reduced = self.broadcast = 0
        self.calls: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        self._saved: dict = {}

    def _record(self, op: str, tensor: torch.Tensor, group) -> None:
        size = dist.get_world_size(group)
        if size == 1:
            return
        nbytes = tensor.numel() * tensor.element_size()
        self.calls.append((op, tensor.dtype, tuple(tensor.shape), size))
        if op == "all_gather":
            self.gathered += (size - 1) * nbytes
        elif op == "all_reduce":
            self.reduced += nbytes
        else:
            self.broadcast += nbytes

    def __enter__(self) -> "CollectiveCounter":
        for op in self._OPS:
            self._saved[op] = original = getattr(dist, op)

            def counted(*args, _op=op, _original=original, **kwargs):
                tensor = args[1] if _op == "all_gather" else args[0]
                # the group is the third argument of all three (all_gather's list, all_reduce's op, broadcast's src)
                self._record(_op, tensor, kwargs.get("group", args[2] if len(args) > 2 else None))
                return _original(*args, **kwargs)

            setattr(dist, op, counted)
        return self

    def __exit__(self, *exc) -> None:
        for op, original in self._saved.items():
            setattr(dist, op, original)
        self._saved = {}


def communication_per_step(config, size: int, tokens: int, dead_mask: bool = True,
                           value_bytes: int = 4) -> tuple[int, int]:
    """(gathered, reduced) bytes of one training step of a latent-sharded SAE (an SAEConfig) on each of the `size`
    ranks of its latent group, for `tokens` tokens per group and the SAE's values of `value_bytes` (4: fp32),
    as CollectiveCounter counts them: gathered = received from all-gathers, reduced = put into all-reduces. With a
    dead mask (the trainer always passes one) the AuxK candidates and ê are communicated even when none is dead.

    - TopK: the local top k per token, (value, ranking, int64 index): (n-1)·N·k'·(2v + 8), k' = min(k, d_sae/n);
    - BatchTopK, Matryoshka: each shard's top k·N values: (n-1)·v·min(k·N, N·d_sae/n);
    - AuxK (TopK family, with a mask): (n-1)·N·k_aux'·(2v + 8), k_aux' = min(k_aux, d_sae/n), and ê [N, d_in];
    - the decode: x̂ [N, d_in] (Matryoshka: one [N, d_in] per prefix band); ReLU/JumpReLU: their per-token penalty
      [N] (and JumpReLU's pre-activation loss);
    - backward: b_dec's gradient [d_in] once per sparse encode that reads it (BatchTopK/Matryoshka: the kept latents
      and AuxK's); the gradient clip's squared norm (one fp32 scalar)."""
    n, d_in, v = size, config.d_in, value_bytes
    d_local = config.d_sae // n
    arch = config.architecture
    gathered, reduced, encodes = 0, v * tokens * d_in, 1
    if arch == "topk":
        gathered += (n - 1) * tokens * min(config.k, d_local) * (2 * v + 8)
    elif arch in ("batchtopk", "matryoshka"):
        gathered += (n - 1) * v * min(config.k * tokens, tokens * d_local)
        if arch == "matryoshka":
            reduced *= len(config.prefixes)
    elif arch in ("relu", "jumprelu"):
        reduced += v * tokens * (2 if arch == "jumprelu" and config.preact_coefficient > 0 else 1)
    else:
        raise SAELightningError(f"the {arch} SAE has no latent-sharded form; nothing to count")
    if dead_mask and arch in ("topk", "batchtopk", "matryoshka"):
        gathered += (n - 1) * tokens * min(config.k_aux_resolved, config.d_sae, d_local) * (2 * v + 8)
        reduced += v * tokens * d_in
        encodes += arch != "topk"
    if config.apply_b_dec_to_input:
        reduced += encodes * v * d_in
    return gathered, reduced + 4
