"""LatentParallelStrategy: a 2-D device mesh, data-parallel x latent-parallel, built from Lightning's DDPStrategy.

The world of P processes is a torch DeviceMesh of shape (P / n, n), dims ("data", "latent"). The n ranks of a
latent group read the same batches and each holds d_sae / n of every sharded SAE's latents (saes/latent.py); the
P / n ranks of a data group hold the same shard and read different batches, and Lightning's DDP wrapper, given
the data group as its process group, averages their gradients exactly as plain DDP does now.

Checkpoints: rank 0 writes the Lightning checkpoint (everything but the sharded tensors) through the checkpoint
plugin (atomic); the first data rank of each latent group writes its shard (the sharded parameters, their Adam
moments and the per-latent trackers) beside it as `<checkpoint>.step<S>.shard<r>of<n>`, before the checkpoint
that names them, so a kill -9 at any moment leaves a checkpoint whose shards are all on disk. A resume reads its
own shard; `saelightning export --ckpt` reads them all (checkpointing.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.device_mesh import init_device_mesh

from saelightning.atomic import atomic_file
from saelightning.errors import SAELightningError
from saelightning.saes.latent import LATENT_AXES, LatentShard


def shard_path(checkpoint: Path, step: int, rank: int, size: int) -> Path:
    return checkpoint.with_name(f"{checkpoint.name}.step{step}.shard{rank}of{size}")


def shard_files(checkpoint: Path) -> list[Path]:
    return sorted(checkpoint.parent.glob(f"{checkpoint.name}.step*.shard*of*"))


def gather_shards(checkpoint: Path, state: dict, record: dict) -> dict:
    """The checkpoint's state_dict with every latent shard's tensors concatenated in rank order (an unsharded
    module loads it)."""
    parts = [read_shard(checkpoint, record, r)["state_dict"] for r in range(record["size"])]
    whole = dict(state)
    for key in parts[0]:
        leaf = key.rsplit(".", 1)[-1]
        axis = LATENT_AXES.get(leaf, 0) if key.startswith("saes.") else 0
        whole[key] = torch.cat([p[key] for p in parts], axis)
    return whole


def read_shard(checkpoint: Path, record: dict, rank: int) -> dict:
    path = shard_path(checkpoint, record["step"], rank, record["size"])
    if not path.is_file():
        raise SAELightningError(f"the latent shard {path.name} of {checkpoint} is missing; resume from a checkpoint "
                                "whose shard files are all beside it (or copy them back)")
    return torch.load(path, map_location="cpu", weights_only=True)


class LatentParallelStrategy(DDPStrategy):
    """DDP over the data dim of a (data, latent) DeviceMesh; the SAEs' latents are split over the latent dim.

    Args:
        latent_parallel_size: ranks that split each SAE's latents (n); the world size must be a multiple of it, and
            the data-parallel size is world / n.
        **kwargs: DDPStrategy's (process_group_backend, timeout, find_unused_parameters, ...).
    """

    strategy_name = "latent_parallel"

    def __init__(self, latent_parallel_size: int = 1, **kwargs):
        if isinstance(latent_parallel_size, bool) or not isinstance(latent_parallel_size, int) or \
                latent_parallel_size < 1:
            raise SAELightningError(f"latent_parallel_size={latent_parallel_size!r} must be a positive integer")
        super().__init__(**kwargs)
        self.latent_parallel_size = latent_parallel_size
        self.mesh = None

    def setup_environment(self) -> None:
        super().setup_environment()  # the process group
        n = self.latent_parallel_size
        if self.world_size % n:
            raise SAELightningError(f"latent_parallel_size={n} does not divide the {self.world_size} processes; "
                                    "set it to a divisor of trainer.devices x trainer.num_nodes")
        self.mesh = init_device_mesh(self.root_device.type, (self.world_size // n, n),
                                     mesh_dim_names=("data", "latent"))
        self._ddp_kwargs["process_group"] = self.data_group  # DDP averages within a data group only

    # --- the mesh as the rest of the package reads it ---

    @property
    def data_group(self):
        return self.mesh.get_group("data")

    @property
    def latent_group(self):
        return self.mesh.get_group("latent")

    @property
    def data_parallel_rank(self) -> int:
        return self.mesh.get_local_rank("data") if self.mesh is not None else 0

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.latent_parallel_size

    @property
    def latent_rank(self) -> int:
        return self.mesh.get_local_rank("latent") if self.mesh is not None else 0

    def latent_shard(self, d_sae: int) -> LatentShard:
        return LatentShard(self.latent_group, self.latent_rank, self.latent_parallel_size, d_sae)

    # --- checkpoints: one file for what every rank shares, one per latent shard ---

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        path = Path(filepath)
        module = self.lightning_module
        mine = module.split_latent_shards(checkpoint)  # this rank's shard, taken out of the checkpoint
        step = int(checkpoint.get("global_step", 0))
        if mine is not None:
            checkpoint["latent_shards"] = {"size": self.latent_parallel_size, "step": step}
            if self.data_parallel_rank == 0:
                with atomic_file(shard_path(path, step, self.latent_rank, self.latent_parallel_size)) as f:
                    torch.save(mine, f)
            dist.barrier()  # every shard is on disk before the checkpoint that names them
        if self.is_global_zero:
            self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)
            for old in shard_files(path):  # the shards of earlier saves to this name
                if not old.name.startswith(f"{path.name}.step{step}.shard"):
                    old.unlink(missing_ok=True)
        if mine is not None:
            dist.barrier()

    def remove_checkpoint(self, filepath) -> None:
        super().remove_checkpoint(filepath)
        if self.is_global_zero:
            for old in shard_files(Path(filepath)):
                old.unlink(missing_ok=True)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        record = checkpoint.get("latent_shards")
        if record is None:
            return checkpoint
        if record["size"] != self.latent_parallel_size:
            raise SAELightningError(f"{checkpoint_path} was trained with latent_parallel_size={record['size']}, this "
                                    f"run has {self.latent_parallel_size}; resume on the same mesh (or export it with "
                                    "`saelightning export --ckpt` and start afresh)")
        self.lightning_module.merge_latent_shards(checkpoint, read_shard(Path(checkpoint_path), record,
                                                                         self.latent_rank))
        return checkpoint
