"""SAEModule: one or several SAEs trained from the same activation stream (a sweep costs one model forward).

Each SAE gets its own Adam param group (its own lr), its own gradient clipping, and its own dead-latent
tracker (tokens since each latent last fired, a persistent buffer so AuxK resumes exactly). The SAEs'
losses are summed: their parameters are disjoint, so each trains exactly as it would alone.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn

from saelightning.errors import SAELightningError
from saelightning.evaluate import add_sums, finalize_scores, spliced_scores
from saelightning.hooks import hook_width, parse_hook
from saelightning.metrics import L0, L1, FeatureDensity, ReconstructionMetrics, firing_counts

# what validation logs from the spliced model (SAELens / SAEBench names)
SPLICED_METRICS = ("ce_loss_score", "ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation",
                   "kl_div_score", "kl_div_with_sae", "kl_div_with_ablation")
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class SAESpec:
    """One SAE to train: where it reads, what it is, how fast it learns."""

    hook_name: str = "blocks.0.hook_resid_post"  # hook point it reads (TransformerLens-style name)
    architecture: str = "topk"  # topk | batchtopk | relu | gated | jumprelu | matryoshka
    d_sae: int | None = None  # number of latents (default: expansion_factor * d_in)
    expansion_factor: float = 8.0  # used when d_sae is not given
    k: int | None = None  # active latents per token (topk-style architectures; default: the SAE's)
    lr: float | None = None  # Adam lr (default: 2e-4 / sqrt(d_sae / 2**14))
    name: str | None = None  # export folder and log prefix (default: <hook>-<architecture>-<d_sae>)
    options: dict[str, Any] = field(default_factory=dict)  # further SAEConfig fields (l1_coefficient, k_aux, ...)


def default_lr(d_sae: int) -> float:
    """The learning-rate scaling of Gao et al. / SAELens: 2e-4 at 2**14 latents, ∝ 1/sqrt(d_sae)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


class WarmupDecay:
    """LambdaLR factor: linear warm-up over `warmup` steps, constant, then linear decay to `end` over the last `decay` steps."""

    def __init__(self, warmup: int, decay: int, total: int, end: float):
        self.warmup, self.decay, self.total, self.end = warmup, decay, total, end

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.decay > 0 and self.total > 0 and step >= self.total - self.decay:
            return self.end + (1 - self.end) * max(self.total - step, 0) / self.decay
        return 1.0


class SkipAdam(torch.optim.Adam):
    """Fused Adam that can skip the update of any param group (one SAE) from a flag on the device: no host sync.

    Before a step, `skip[group name]` may hold a 0-dim float tensor (1.0: skip). It reaches the fused kernel as
    that group's `found_inf`, the mechanism GradScaler uses for inf gradients: a skipped group's parameters,
    moments and step count stay exactly as they were. A `found_inf` set from outside (a GradScaler's) is added
    to every group's flag. The flags are cleared after each step.
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self.skip: dict[str, torch.Tensor] = {}

    def step(self, closure=None):
        loss = None
        if closure is not None:  # the closure (Lightning's: forward, backward, clipping) sets the flags
            with torch.enable_grad():
                loss = closure()
        groups, outer = self.param_groups, self.__dict__.pop("found_inf", None)
        try:
            for group in groups:  # one group at a time, so that each gets its own flag
                flag = self.skip.get(group.get("name"))
                if outer is not None:
                    flag = outer if flag is None else (flag + outer.to(flag)).clamp(max=1)
                self.param_groups = [group]
                self.found_inf = flag
                super().step()
        finally:
            self.param_groups = groups
            self.__dict__.pop("found_inf", None)
            if outer is not None:
                self.found_inf = outer
            self.skip.clear()
        return loss


class Readback:
    """A small device tensor read on the host without stalling the GPU.

    On CUDA each call copies the value into a ring of pinned buffers behind an event and returns the value
    of `lag` calls earlier (so every DDP rank reads the same step's value at the same step); elsewhere it
    returns the value at once. Returns (values as a list, tag) or None while the first `lag` calls are in flight.
    """

    def __init__(self, lag: int = 2):
        self.lag, self.calls = lag, 0
        self.pending: deque = deque()
        self.ring: list[torch.Tensor] = []

    def __call__(self, value: torch.Tensor, tag=None):
        if value.device.type != "cuda":
            return value.tolist(), tag
        if not self.ring:
            self.ring = [torch.empty(value.shape, dtype=value.dtype, pin_memory=True) for _ in range(self.lag + 1)]
        host = self.ring[self.calls % len(self.ring)]  # the `lag` pending copies hold the other buffers
        self.calls += 1
        host.copy_(value, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((host, event, tag))
        if len(self.pending) <= self.lag:
            return None
        host, event, tag = self.pending.popleft()
        event.synchronize()  # recorded `lag` steps ago: long complete, so this does not wait
        return host.tolist(), tag


def _as_spec(spec) -> SAESpec:
    if isinstance(spec, SAESpec):
        return spec
    if isinstance(spec, dict):
        return SAESpec(**spec)
    raise SAELightningError(f"an SAE spec must be a mapping of SAESpec fields, got {type(spec).__name__}")


def build_from_spec(spec: SAESpec, d_in: int):
    """An SAE (untrained) for a spec at a hook point of width d_in."""
    from saelightning.saes import SAEConfig, build_sae

    d_sae = spec.d_sae or int(round(spec.expansion_factor * d_in))
    fields = {f.name for f in dataclasses.fields(SAEConfig)}
    unknown = sorted(set(spec.options) - fields)
    if unknown:
        raise SAELightningError(f"unknown SAE option(s) {unknown}; valid options are {sorted(fields - {'d_in', 'd_sae'})}")
    kwargs = dict(spec.options, architecture=spec.architecture, d_in=d_in, d_sae=d_sae)
    if spec.k is not None:
        kwargs["k"] = spec.k
    return build_sae(SAEConfig(**kwargs))


class SAEModule(pl.LightningModule):
    """Trains the SAEs in `saes` on the activation stream of ActivationDataModule.

    Args:
        saes: the SAEs to train (SAESpec fields; one model forward serves them all).
        n_layer: the nanochat model's depth (linked from the data module by the CLI).
        d_model: the nanochat model's width (linked from the data module by the CLI).
        model_info: the nanochat model's path/step/era/config (linked; recorded in exports).
        warmup_steps: linear lr warm-up steps.
        decay_steps: linear lr decay over the last steps of trainer.max_steps (0: none).
        lr_end_factor: lr factor at the end of the decay.
        betas: Adam betas.
        eps: Adam eps (small, as for TopK SAEs).
        grad_clip: clip each SAE's gradient norm to this, in the units of SAELens's loss E||x - x̂||² (an SAE
            whose loss is normalised, like TopK's fvu, is clipped at grad_clip / d_in); None: no clipping.
        dead_window_tokens: a latent not fired in this many tokens counts as dead (AuxK, resampling, logs).
        max_nonfinite_steps: a step whose activations, loss or gradients are not finite is skipped (no update,
            counted in details/nonfinite_skipped); this many in a row stop the run with an error.
        spliced_eval: at each validation, also splice every SAE into the frozen model on the val tokens and
            log ce_loss_score, kl_div_score and the CE/KL they come from (1 + #hooks + #SAEs model forwards
            per val batch).
    """

    def __init__(self, saes: list[SAESpec] | None = None, n_layer: int = 0, d_model: int = 0,
                 model_info: dict | None = None, warmup_steps: int = 1000, decay_steps: int = 0,
                 lr_end_factor: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 6.25e-10,
                 grad_clip: float | None = 1.0, dead_window_tokens: int = 10_000_000, max_nonfinite_steps: int = 10,
                 spliced_eval: bool = True):
        super().__init__()
        specs = [_as_spec(s) for s in (saes or [SAESpec()])]
        if n_layer < 1 or d_model < 1:
            raise SAELightningError("SAEModule needs n_layer and d_model of the nanochat model (the CLI links them from data)")
        self.save_hyperparameters({
            "saes": [dataclasses.asdict(s) for s in specs], "n_layer": n_layer, "d_model": d_model,
            "model_info": model_info or {}, "warmup_steps": warmup_steps, "decay_steps": decay_steps,
            "lr_end_factor": lr_end_factor, "betas": list(betas), "eps": eps, "grad_clip": grad_clip,
            "dead_window_tokens": dead_window_tokens, "max_nonfinite_steps": max_nonfinite_steps,
            "spliced_eval": spliced_eval,
        })
        self.model_info = model_info or {}
        self.saes = nn.ModuleDict()
        self.specs: dict[str, SAESpec] = {}
        for spec in specs:
            parse_hook(spec.hook_name, n_layer)
            sae = build_from_spec(spec, hook_width(spec.hook_name, n_layer, d_model))
            name = spec.name or f"{spec.hook_name.replace('.', '_')}-{spec.architecture}-{sae.config.d_sae}"
            if not _NAME.match(name) or name in self.saes:
                raise SAELightningError(f"SAE name {name!r} is invalid or repeated; use unique names of letters, digits, _ and -")
            self.saes[name], self.specs[name] = sae, spec
            self.register_buffer(f"since_fired__{name}", torch.zeros(sae.config.d_sae, dtype=torch.long))
            self.register_buffer(f"initialized__{name}", torch.zeros((), dtype=torch.bool))
            self.register_buffer(f"density__{name}", torch.full((sae.config.d_sae,), float("nan")))
            # firing counts of the density window in progress, pooled over ranks: a buffer, so a resumed
            # run's window (and the density it exports) is the uninterrupted run's
            self.register_buffer(f"window__{name}", torch.zeros(sae.config.d_sae, dtype=torch.float64))
            self.register_buffer(f"window_tokens__{name}", torch.zeros((), dtype=torch.float64))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))  # SAE training tokens, all ranks
        self.register_buffer("nonfinite_skipped", torch.zeros((), dtype=torch.long))  # steps skipped so far
        # [skipped steps in a row now, the longest such run, what the last one had: 1 activations, 2 loss]
        self.register_buffer("_nonfinite_runs", torch.zeros(3, dtype=torch.long), persistent=False)
        self._runs_readback = Readback()
        self._step_bad: torch.Tensor | None = None  # this step's skip flag (0/1 on the device, agreed by all ranks)
        self._skipped: dict[str, torch.Tensor] = {}  # per SAE: this step's update is skipped (0/1 on the device)
        self._initialized: set[str] = set()  # SAEs known initialised (read from the buffer once, not every step)
        self.train_metrics = nn.ModuleDict({n: self._metric_set(s) for n, s in self.saes.items()})
        self.val_metrics = nn.ModuleDict({n: self._metric_set(s) for n, s in self.saes.items()})
        self.density_step = -1  # global step of the last completed density window (callbacks watch it)
        self._clock: tuple[float, int] | None = None
        self._spliced: dict | None = None  # spliced CE/KL sums over the current validation

    @staticmethod
    def _metric_set(sae) -> nn.ModuleDict:
        return nn.ModuleDict({"rec": ReconstructionMetrics(sae.config.d_in), "l0": L0(), "l1": L1(),
                              "density": FeatureDensity(sae.config.d_sae)})

    # --- facts other parts read ---

    @property
    def hook_names(self) -> list[str]:
        return list(dict.fromkeys(s.hook_name for s in self.specs.values()))

    def prefix(self, name: str) -> str:
        return f"{name}/" if len(self.saes) > 1 else ""

    def since_fired(self, name: str) -> torch.Tensor:
        return getattr(self, f"since_fired__{name}")

    def dead_mask(self, name: str) -> torch.Tensor:
        return self.since_fired(name) >= self.hparams.dead_window_tokens

    def density(self, name: str) -> torch.Tensor:
        """Firing frequency per latent over the last completed window of dead_window_tokens (NaN before one)."""
        return getattr(self, f"density__{name}")

    def world_batch(self, batch_tokens: int) -> int:
        return batch_tokens * (self.trainer.world_size if self._trainer is not None else 1)

    # --- optimisation ---

    def configure_optimizers(self):
        groups = []
        for name, sae in self.saes.items():
            lr = self.specs[name].lr or default_lr(sae.config.d_sae)
            groups.append({"params": list(sae.parameters()), "lr": lr, "name": name})
        optimizer = SkipAdam(groups, betas=tuple(self.hparams.betas), eps=self.hparams.eps)
        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else 0
        schedule = WarmupDecay(self.hparams.warmup_steps, self.hparams.decay_steps, total, self.hparams.lr_end_factor)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        for sae in self.saes.values():
            sae.before_optimizer_step()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip each SAE's gradient on its own (one SAE of a sweep never scales another's step), and flag for
        SkipAdam the SAEs whose update is skipped: all of them on a skipped step, and any whose gradient
        norm is not finite (gradients are synced by now, so every rank flags the same). No host sync."""
        step_bad = self._step_bad if self._step_bad is not None else self.nonfinite_skipped.new_zeros((), dtype=torch.float32)
        dropped = torch.zeros_like(step_bad)
        for name, sae in self.saes.items():
            clip = self.hparams.grad_clip * sae.grad_clip_scale() if self.hparams.grad_clip else math.inf
            norm = nn.utils.clip_grad_norm_(sae.parameters(), clip)
            bad_grads = (~torch.isfinite(norm)).to(step_bad.dtype)
            dropped = torch.maximum(dropped, bad_grads)
            self._skipped[name] = torch.maximum(step_bad, bad_grads)
            if isinstance(optimizer, SkipAdam):
                optimizer.skip[name] = self._skipped[name]
        self.nonfinite_skipped += (dropped * (1 - step_bad)).long()  # a skipped step is counted once

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        for name, sae in self.saes.items():
            sae.after_optimizer_step(self._skipped.pop(name, None))

    # --- training ---

    def _prepare(self, name: str, sae, x: torch.Tensor, scale: float) -> None:
        sae.input_scale.fill_(scale)
        if name in self._initialized:
            return
        initialized = getattr(self, f"initialized__{name}")
        if not initialized:  # a host sync, once per SAE and run
            if self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(x).all()), all=False):
                return  # never initialised from a bad batch: this step is skipped, the next good one initialises
            sae.init_from_batch(x)
            if dist.is_available() and dist.is_initialized():  # every rank starts from rank 0's init
                for t in list(sae.parameters()) + list(sae.buffers()):
                    dist.broadcast(t.data, 0)
            initialized.fill_(True)
        self._initialized.add(name)

    def _sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place, with one all-reduce. Not Lightning's strategy.reduce: it puts a barrier
        first, and an NCCL barrier makes the host wait for the GPU. Every rank calls this in the same order."""
        if self._trainer is not None and self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def _track(self, name: str, counts: torch.Tensor, good: torch.Tensor, step_tokens: torch.Tensor,
               batch_tokens: int) -> None:
        """Dead tracker and density window from this step's firing counts, summed over ranks (one all-reduce);
        a skipped step (good = 0, step_tokens = 0) adds neither counts nor tokens."""
        counts = self._sum_over_ranks(counts * good)  # the same tracker on every rank
        since = self.since_fired(name)
        since += step_tokens.long()
        since.masked_fill_(counts > 0, 0)  # not since[fired] = 0: boolean indexing syncs with the host
        self._window(name, counts, step_tokens, batch_tokens)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The SAEs' summed loss. A step whose activations or loss hold a NaN/inf (on any rank) is skipped
        without a host sync: backward still runs, but SkipAdam leaves every SAE as it was, the SAEs'
        step buffers are put back, and the trackers and token count take nothing from it."""
        acts = batch["acts"]
        # a sum is NaN/inf when an entry is (a finite sum only overflows for entries whose squares, and so the
        # loss, overflow anyway), and one pass is ~5x cheaper than isfinite().all()
        acts_bad = ~torch.isfinite(torch.stack([a.sum(dtype=torch.float32) for a in acts.values()])).all()
        total, outputs, saved = 0.0, {}, {}
        for name, sae in self.saes.items():
            spec = self.specs[name]
            x = acts[spec.hook_name]
            self._prepare(name, sae, x, batch["scales"][spec.hook_name])
            sae.set_training_step(self.global_step)
            saved[name] = [getattr(sae, b).clone() for b in sae.step_buffers]
            # k-sparse SAEs hand back (values, indices): nothing in a training step needs dense latents
            sparse = {"sparse": True} if sae.sparse_forward else {}
            outputs[name] = (x, *sae(x, dead_mask=self.dead_mask(name), **sparse))
            total = total + outputs[name][-1]["loss"]
        bad = (acts_bad | ~torch.isfinite(total)).float()
        bad = self._sum_over_ranks(bad).clamp(max=1)  # every rank skips if any must
        self._step_bad, good = bad, 1 - bad
        n_tokens = acts[self.hook_names[0]].shape[0]
        step_tokens = good * self.world_batch(n_tokens)  # SAE training tokens of this step over all ranks (0 if skipped)
        for name, sae in self.saes.items():
            for b, before in zip(sae.step_buffers, saved[name]):
                getattr(sae, b).copy_(torch.where(bad > 0, before, getattr(sae, b)))
        log_now = self._should_log()
        log_metrics = log_now and not bool(bad)  # a logging step syncs anyway; a skipped one logs no train metrics
        for name, (x, x_hat, latents, losses) in outputs.items():
            counts = firing_counts(latents)  # one pass serves the dead tracker and the density window
            self._track(name, counts, good, step_tokens, n_tokens)
            if log_metrics:  # like SAELens: train metrics of the logged step's batch (the rest would cost every step)
                self._update(self.train_metrics[name], x.detach(), x_hat.detach(), latents.detach())
                self._log_train(name, losses)
        self.tokens_seen += step_tokens.long()
        self._count_nonfinite(bad, acts_bad)
        if log_now:
            self._log_throughput(n_tokens)
        return total

    def _count_nonfinite(self, bad: torch.Tensor, acts_bad: torch.Tensor) -> None:
        """Count a skipped step; stop the run once max_nonfinite_steps in a row were skipped. The run length is
        read back on the host without a sync (on CUDA two steps late, at the same step on every rank)."""
        self.nonfinite_skipped += bad.long()
        runs = self._nonfinite_runs
        run = (runs[0] + 1) * bad.long()
        what = torch.where(bad > 0, 2 - acts_bad.long(), runs[2])
        runs.copy_(torch.stack([run, torch.maximum(runs[1], run), what]))
        seen = self._runs_readback(runs, self.global_step)
        if seen is None or seen[0][1] < self.hparams.max_nonfinite_steps:
            return
        (_, longest, what), step = seen
        raise SAELightningError(
            f"{longest} steps in a row had non-finite {'activations' if what == 1 else 'loss'} (last at step {step}); the "
            "run stopped and its last checkpoint is the last good state: check the model/data for NaN/inf or lower the lr"
        )

    @staticmethod
    def _update(metrics: nn.ModuleDict, x, x_hat, latents) -> None:
        metrics["rec"].update(x, x_hat)
        metrics["l0"].update(latents)
        metrics["l1"].update(latents)
        metrics["density"].update(latents)

    def _window(self, name: str, counts: torch.Tensor, step_tokens: torch.Tensor, batch_tokens: int) -> None:
        """Feature density over windows of dead_window_tokens (a fixed step count, so ranks agree)."""
        window, tokens = getattr(self, f"window__{name}"), getattr(self, f"window_tokens__{name}")
        window += counts
        tokens += step_tokens  # skipped (non-finite) steps add neither
        steps = max(1, math.ceil(self.hparams.dead_window_tokens / self.world_batch(batch_tokens)))
        if (self.global_step + 1) % steps == 0:
            self.density(name).copy_(window / tokens)
            window.zero_()
            tokens.zero_()
            self.density_step = self.global_step

    def _should_log(self) -> bool:
        return (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0

    def _log_train(self, name: str, losses: dict) -> None:
        p, metrics = self.prefix(name), self.train_metrics[name]
        values = {f"{p}losses/{'overall_loss' if k == 'loss' else k}": v.detach() for k, v in losses.items()}
        rec = metrics["rec"].compute()  # pooled over ranks
        values[f"{p}metrics/explained_variance"] = rec["explained_variance"]
        values[f"{p}metrics/mse"] = rec["mse"]
        values[f"{p}metrics/l0"] = metrics["l0"].compute()
        values[f"{p}metrics/l1"] = metrics["l1"].compute()
        values[f"{p}sparsity/dead_fraction"] = self.dead_mask(name).float().mean()
        group = next(g for g in self.optimizers().optimizer.param_groups if g["name"] == name)
        values[f"{p}details/current_learning_rate"] = torch.tensor(group["lr"])
        for m in metrics.values():
            m.reset()
        self.log_dict({k: v.float() for k, v in values.items()}, on_step=True, on_epoch=False, sync_dist=False)

    def _log_throughput(self, batch_tokens: int) -> None:
        now, step = time.perf_counter(), self.global_step
        if self._clock is not None and step > self._clock[1]:
            rate = (step - self._clock[1]) * self.world_batch(batch_tokens) / (now - self._clock[0])
            self.log("details/tokens_per_second", rate, on_step=True, on_epoch=False)
        self._clock = (now, step)
        self.log("details/n_training_tokens", self.tokens_seen.float(), on_step=True, on_epoch=False)
        self.log("details/nonfinite_skipped", self.nonfinite_skipped.float(), on_step=True, on_epoch=False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the latest logged scalars, so `saelightning export --ckpt` can put them in cfg.json metadata
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
        checkpoint["saelightning_metrics"] = {k: v for k, v in metrics.items() if math.isfinite(v)}

    # --- validation: reconstruction metrics on val activations, CE/KL with each SAE spliced in ---

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        for name, sae in self.saes.items():
            x = batch["acts"][self.specs[name].hook_name]
            sae.input_scale.fill_(batch["scales"][self.specs[name].hook_name])
            x_hat, latents, losses = sae(x)
            metrics, p = self.val_metrics[name], self.prefix(name)
            self._update(metrics, x, x_hat, latents)
            # Metric objects: Lightning computes them (synced over ranks) at the end of the val epoch
            self.log(f"{p}val/l0", metrics["l0"], on_step=False, on_epoch=True, batch_size=x.shape[0])
            self.log(f"{p}val/l1", metrics["l1"], on_step=False, on_epoch=True, batch_size=x.shape[0])
        if self.hparams.get("spliced_eval", True) and "tokens" in batch:
            self._spliced = add_sums(self._spliced, self._spliced_sums(batch["tokens"]))

    def _spliced_sums(self, tokens: torch.Tensor) -> dict:
        """Spliced CE/KL sums of every SAE on one val batch (the training SAEs, scaled as they train)."""
        data = self.trainer.datamodule
        saes = {}
        for name, sae in self.saes.items():
            saes.setdefault(self.specs[name].hook_name, []).append(sae)
        sums = spliced_scores(data.model, saes, tokens.to(self.device), data.tokenizer.bos_id)
        names = {hook: [n for n in self.saes if self.specs[n].hook_name == hook] for hook in saes}
        return {name: s for hook, group in sums.items() for name, s in zip(names[hook], group)}

    def on_validation_epoch_end(self) -> None:
        for name in self.saes:
            metrics, p = self.val_metrics[name], self.prefix(name)
            values = {f"{p}val/{k}": v.float() for k, v in metrics["rec"].compute().items()}
            values[f"{p}val/dead_fraction"] = (metrics["density"].compute() == 0).float().mean()
            metrics["rec"].reset()
            metrics["density"].reset()
            values.update(self._spliced_metrics(name, p))
            self.log_dict(values, sync_dist=False)
        self._spliced = None

    def _spliced_metrics(self, name: str, p: str) -> dict:
        if self._spliced is None:
            return {}
        sums = self._spliced[name]
        if dist.is_available() and dist.is_initialized():
            for v in sums.values():  # sums pool over ranks by adding
                dist.all_reduce(v)
        scores = finalize_scores(sums)
        return {f"{p}val/{k}": torch.tensor(scores[k], dtype=torch.float32) for k in SPLICED_METRICS}
