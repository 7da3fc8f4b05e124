"""Callbacks: dead-latent resampling, SAE export, feature-density histograms."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only

from saelightning.dashboards.stats import density_summary
from saelightning.errors import SAELightningError
from saelightning.export import save_clt, save_sae
from saelightning.metrics import log10_density
from saelightning.modeldiff import diff_summary
from saelightning.saes.clt import CrossLayerTranscoder
from saelightning.saes.latent import LATENT_AXES, all_gather_cat

# --- resampling ---

def _latent_axis(name: str, param: torch.Tensor, sae) -> int | None:
    """Which axis of a parameter indexes latents (None: it has none); a latent-sharded SAE's are named."""
    if sae.shard is not None:
        return LATENT_AXES[name] if name in sae.sharded_names() else None
    d_sae = sae.config.d_sae
    if param.dim() == 1:
        return 0 if param.shape[0] == d_sae else None
    if name.startswith("W_dec"):
        return 0
    return 1 if param.shape[-1] == d_sae else None


def reset_adam_rows(optimizer: torch.optim.Optimizer, sae, latents: torch.Tensor) -> int:
    """Zero the Adam moments of exactly the given latents' rows/columns (this rank's indices when sharded) in every
    parameter of `sae`."""
    touched = 0
    for name, param in sae.named_parameters():
        axis = _latent_axis(name, param, sae)
        state = optimizer.state.get(param, {})
        if axis is None or not state:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            state[key].index_fill_(axis, latents, 0.0)
        touched += 1
    return touched


@torch.no_grad()
def resample(sae, latents: torch.Tensor, x: torch.Tensor, generator: torch.Generator,
             y: torch.Tensor | None = None) -> torch.Tensor:
    """Anthropic's procedure: sample inputs with probability ∝ squared reconstruction error; the dead decoder
    row becomes the normalised sample, the encoder column the sample x 0.2 x mean alive encoder norm, bias 0.
    A transcoder (y: its targets) is scored on y, and its decoder row is the sampled token's y, normalised.

    A latent-sharded SAE (a collective over its latent group, every rank with the same `latents`, global indices,
    and the same x): each rank rewrites the latents it holds, from the same samples, with the mean over the alive
    columns of every shard. Returns the indices rewritten here (local ones when sharded)."""
    y = x if y is None else y
    x_hat = sae.reconstruct(x)  # not forward: it may update running statistics
    loss = (y - x_hat).pow(2).sum(-1).double()
    probs = loss / loss.sum() if loss.sum() > 0 else torch.full_like(loss, 1 / len(loss))
    picks = torch.multinomial(probs.cpu(), len(latents), replacement=len(latents) > len(loss), generator=generator)
    picks = picks.to(x.device)

    def unit(rows):
        return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    enc_dirs, dec_dirs = unit(x[picks]), unit(y[picks])
    norms = sae.W_enc.norm(dim=0)
    if sae.shard is not None:  # every column's norm (d_sae values), so the mean is the unsharded one
        norms = all_gather_cat(norms, sae.shard, 0)
    alive = torch.ones(sae.config.d_sae, dtype=torch.bool, device=x.device)
    alive[latents] = False
    enc_norm = norms[alive].mean() if alive.any() else torch.tensor(1.0, device=x.device)
    here = latents
    if sae.shard is not None:
        local, mine = sae.shard.own(latents)
        here, enc_dirs, dec_dirs = local[mine], enc_dirs[mine], dec_dirs[mine]
    sae.reinit_latents(here, enc_dirs * 0.2 * enc_norm, dec_dirs)
    return here


def _gather(x: torch.Tensor, group=None) -> torch.Tensor:
    """The rows of every rank (of `group`; None: all), in rank order (the same tensor on all of them)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


class ResampleDeadLatents(pl.Callback):
    """Resample latents dead over the module's window every `every_n_steps` steps, up to `until_step`.

    The inputs are the current batch of every rank (gathered), and the sampling generator is seeded
    from (seed, step) on every rank, so each rank makes exactly the same change.

    Args:
        every_n_steps: resample at these steps (0: never).
        until_step: no resampling after this step (resampling late in training hurts).
        seed: seed of the sampling generator.
    """

    def __init__(self, every_n_steps: int = 0, until_step: int = 100_000, seed: int = 0):
        self.every_n_steps, self.until_step, self.seed = every_n_steps, until_step, seed
        self.history: list[dict] = []  # {"step", "sae", "resampled"}

    def on_fit_start(self, trainer, pl_module) -> None:
        clts = [n for n, s in pl_module.saes.items() if isinstance(s, CrossLayerTranscoder)]
        if self.every_n_steps and clts:
            raise SAELightningError(f"resampling does not apply to the cross-layer transcoder(s) {clts}; "
                                    "set resample.every_n_steps: 0")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps or step > self.until_step:
            return
        for name, n in self.apply(pl_module, trainer.optimizers[0], batch["acts"], step).items():
            pl_module.log(f"{pl_module.prefix(name)}sparsity/resampled", float(n), on_step=True, on_epoch=False)

    def apply(self, pl_module, optimizer, acts: dict, step: int) -> dict[str, int]:
        """Resample every SAE's dead latents from this batch (all ranks'); returns {name: count}."""
        counts = {}
        for name, sae in pl_module.saes.items():
            mask = pl_module.dead_mask(name)
            if sae.shard is not None:  # the whole SAE's dead latents, the same on every rank of the latent group
                mask = all_gather_cat(mask.to(torch.uint8), sae.shard, 0).bool()
            dead = mask.nonzero().flatten()
            if len(dead) == 0:
                continue
            # the batches of the data-parallel ranks (a latent group's ranks read the same one)
            group = pl_module._data_group()
            x = _gather(pl_module.sae_input(name, acts), group)
            y = _gather(acts[pl_module.target_hook(name)], group) if sae.config.is_transcoder else None
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            here = resample(sae, dead, x, generator, y)
            reset_adam_rows(optimizer, sae, here)
            pl_module.since_fired(name)[here] = 0  # give them a full window before judging again
            self.history.append({"step": step, "sae": name, "resampled": len(dead)})
            counts[name] = len(dead)
        return counts

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])


# --- export ---

def _run_dir(trainer) -> Path:
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.dirpath)
    return Path(trainer.default_root_dir)


def export_dir(trainer) -> Path:
    return _run_dir(trainer) / "saes"


def export_module(pl_module, out_root: Path, step: int, metrics: dict | None = None,
                  metrics_step: int | None = None, write: bool = True) -> list[Path]:
    """save_sae every SAE of the module to out_root/<name>/ (SAELens layout, weights on raw activations).

    metrics: the latest logged scalars; metrics_step: the global step of the validation that gave their
    val/* figures (recorded as final_metrics_step: the weights are those of `step`). A latent-sharded SAE is
    gathered whole first (every rank calls this; only those with `write` write).
    """
    paths = []
    for name in pl_module.saes:
        sae, density, density_tokens = pl_module.whole(name)
        if not write:
            continue
        spec, info = pl_module.specs[name], pl_module.model_info
        prefix = pl_module.prefix(name)
        mine = ({k[len(prefix):]: v for k, v in (metrics or {}).items() if k.startswith(prefix)} if prefix
                else dict(metrics or {}))
        metadata = {
            "model_name": "nanochat", "hook_name": spec.hook_name, "context_size": info.get("context_size"),
            **({"hook_name_out": spec.hook_name_out} if spec.hook_name_out else {}),
            "model": {k: info.get(k) for k in ("path", "step", "era", "config")}, "sae_name": name,
            "trained_on": info.get("trained_on"),
            "training_steps": step, "training_tokens": int(pl_module.tokens_seen),
            "trainer_config": {k: v for k, v in pl_module.hparams.items() if k not in ("saes", "model_info")},
            "spec": {k: v for k, v in vars(spec).items()}, "final_metrics": mine, "final_metrics_step": metrics_step,
            "sparsity_tokens": density_tokens,  # the tokens sparsity.safetensors counts firings over
        }
        if pl_module.is_crosscoder(name):  # every model it reads, its hook, and what Δ says of its latents
            metadata["models"] = info.get("models")
            names = tuple(m["name"] for m in info.get("models") or [])[:2] or None
            metadata["diff"] = diff_summary(sae, pl_module.diff_thresholds, names)
        sparsity = log10_density(density) if torch.isfinite(density).all() else None
        try:
            save = save_clt if isinstance(sae, CrossLayerTranscoder) else save_sae
            paths.append(save(sae, out_root / name, metadata=metadata, sparsity=sparsity))
        except SAELightningError as e:  # e.g. NaN weights: nothing of this SAE was written
            raise SAELightningError(f"SAE {name!r} at step {step} not exported: {e}") from None
    return paths


def _scalar_metrics(trainer) -> dict:
    out = {}
    for k, v in trainer.callback_metrics.items():
        value = float(v)
        if math.isfinite(value):
            out[k] = value
    return out


class ExportSAEs(pl.Callback):
    """Write <run dir>/saes/<name>/ (cfg.json, sae_weights.safetensors, sparsity.safetensors) at every
    checkpoint save and at the end of training, with the model info and the latest metrics in metadata.

    Args:
        enabled: export (False: only Lightning checkpoints; `saelightning export --ckpt` can export later).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.last_export: list[Path] = []

    def _export(self, trainer, pl_module) -> None:
        if not (self.enabled and trainer.global_step > 0):
            return
        if not trainer.is_global_zero and not pl_module.sharded:
            return
        # sharded SAEs are gathered on every rank (a collective); rank 0 writes
        paths = export_module(pl_module, export_dir(trainer), trainer.global_step, _scalar_metrics(trainer),
                              pl_module.last_val_step, write=trainer.is_global_zero)
        if trainer.is_global_zero:
            self.last_export = paths

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._export(trainer, pl_module)


class FinalCheckpoint(pl.Callback):
    """Save last.ckpt when training ends, unless it already holds the final state and metrics: after
    max_steps between ModelCheckpoint's intervals, and after a validation at the step of the last save
    (ModelCheckpoint saves before that validation runs), so that `--ckpt_path last` continues from the
    final state and `saelightning export --ckpt last.ckpt` carries the final validation's metrics."""

    def __init__(self):
        self._validated_after_save = False

    def on_validation_end(self, trainer, pl_module) -> None:
        callback = trainer.checkpoint_callback
        self._validated_after_save = getattr(callback, "_last_global_step_saved", -1) == trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        callback = trainer.checkpoint_callback
        if callback is None or not getattr(callback, "save_last", False) or callback.dirpath is None:
            return
        path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        stale = getattr(callback, "_last_global_step_saved", -1) != trainer.global_step or self._validated_after_save
        if stale and trainer.global_step > 0:
            # on every rank: the data state gathers all ranks' positions
            trainer.save_checkpoint(path, weights_only=False)
            callback._last_global_step_saved = trainer.global_step
            callback.last_model_path = str(path)
            self._validated_after_save = False


class CleanFailedStart(pl.Callback):
    """A fit that fails or is stopped before its first training step leaves nothing behind: the log version
    it opened holds only start-up files (config.yaml, hparams.yaml, an events file of hparams), and it is
    removed, with lightning_logs/ and the run dir when they are left empty."""

    START_FILES = ("config.yaml", "hparams.yaml")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        start = getattr(pl_module, "start_step", None)
        if not trainer.is_global_zero or (start is not None and trainer.global_step > start):
            return
        for logger in trainer.loggers:
            folder = getattr(logger, "log_dir", None)
            if folder is None or not Path(folder).is_dir():
                continue
            files = list(Path(folder).iterdir())
            if all(f.is_file() and (f.name in self.START_FILES or f.name.startswith("events.out.tfevents"))
                   for f in files):
                shutil.rmtree(folder, ignore_errors=True)
                for parent in (Path(folder).parent, _run_dir(trainer)):
                    if parent.is_dir() and not any(parent.iterdir()):
                        parent.rmdir()


# --- TensorBoard ---

def _experiments(trainer, method: str) -> list:
    """The loggers' writers that have `method` (TensorBoard's SummaryWriter)."""
    found = (getattr(logger, "experiment", None) for logger in trainer.loggers)
    return [e for e in found if e is not None and hasattr(e, method)]


class DensityHistograms(pl.Callback):
    """log10 feature-density histograms to TensorBoard, once per completed density window, and a text
    summary of the most and least frequent latents at the end of training.

    Args:
        enabled: log them (False: skip).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._logged = -1

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        # a short text summary (most / least frequent latents) of the last density window per SAE
        if not self.enabled:
            return
        for experiment in _experiments(trainer, "add_text"):
            for name in pl_module.saes:
                density = pl_module.density(name)
                if torch.isnan(density).any():
                    continue  # no window completed: nothing to summarise
                experiment.add_text(f"{pl_module.prefix(name)}sparsity/summary", density_summary(density),
                                    trainer.global_step)

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled or pl_module.density_step == self._logged:
            return
        self._logged = pl_module.density_step
        for experiment in _experiments(trainer, "add_histogram"):
            for name in pl_module.saes:
                values = log10_density(pl_module.density(name)).cpu()
                experiment.add_histogram(f"{pl_module.prefix(name)}sparsity/log10_feature_density", values,
                                         trainer.global_step)
                experiment.add_scalar(f"{pl_module.prefix(name)}sparsity/mean_log10_feature_density", values.mean(),
                                      trainer.global_step)


class SAEProgressBar(TQDMProgressBar):
    """Lightning's fit bar with each SAE's loss, EV and L0 and the tokens per second (the module logs them with
    prog_bar=True), under short names: `loss`, or `resid2_topk.loss` when several SAEs train at once. The
    TensorBoard version number (v_num) is left out: the summary at the end names the log dir."""

    SHORT = {"losses/overall_loss": "loss", "metrics/explained_variance": "EV", "metrics/l0": "L0",
             "details/tokens_per_second": "tok/s"}

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        out = {}
        for key, value in items.items():
            for long, short in self.SHORT.items():
                if key == long or key.endswith(f"/{long}"):
                    prefix = key[:-len(long)].rstrip("/")
                    key = f"{prefix}.{short}" if prefix else short
                    break
            out[key] = value
        if "tok/s" in out and isinstance(out["tok/s"], (int, float)):
            out["tok/s"] = f"{out['tok/s']:,.0f}"
        return out
