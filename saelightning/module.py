"""SAEModule: one or several SAEs trained from the same activation stream (a sweep costs one model forward).

Each SAE gets its own Adam param group (its own lr), its own gradient clipping and its own SAEState
(dead-latent tracker and feature-density window, persistent buffers so a resumed run continues them
exactly). The SAEs' losses are summed: their parameters are disjoint, so each trains exactly as it
would alone. A step with NaN/inf anywhere is skipped by the NonFiniteGuard (guard.py).

The hook points are the nanochat model's (checked against its hook grammar, widths from n_layer and d_model)
or, for a model-free source (data.activations, data.synthetic), the source's own names and widths
(hook_widths). Validation splices the SAEs into the model, or evaluates them on the source's held-out
activations; a synthetic source adds the metrics against its true features (groundtruth.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
import time
from dataclasses import dataclass
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from saelightning.errors import SAELightningError
from saelightning.evaluate import encode_decode, evaluate_batch
from saelightning.faults import stop_requested
from saelightning.groundtruth import GroundTruthMetrics
from saelightning.guard import NonFiniteGuard
from saelightning.hooks import forward_position, hook_width, parse_hook
from saelightning.metrics import ReconstructionMetrics, SAEMetrics
from saelightning.modeldiff import DiffThresholds, class_counts, class_name, classify, relative_norms
from saelightning.optim import SkipAdam, WarmupDecay, default_lr
from saelightning.saes import ARCHITECTURES, SAEConfig, build_sae
from saelightning.saes.base import CROSSCODERS, SAEOptions
from saelightning.saes.clt import CLT_ARCHITECTURES, CrossLayerTranscoder
from saelightning.saes.latent import all_gather_cat, sum_partials
from saelightning.saes.sparse import SparseLatents

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
Architecture = Literal["topk", "batchtopk", "relu", "gated", "jumprelu", "matryoshka", "crosscoder",
                       "crosscoder_l1"]  # = saes.ARCHITECTURES


@dataclass
class SAESpec(SAEOptions):
    """One SAE to train: where it reads, what it is, how fast it learns, and its architecture's options.

    Args:
        hook_name: the hook point it reads (TransformerLens-style name, e.g. blocks.3.hook_resid_post; with
            data.activations a hook its manifest lists, with data.synthetic "synthetic"; with data.models an SAE
            names its model, chat/blocks.3.hook_resid_post, and a crosscoder reads the hook in every model).
        architecture: topk | batchtopk | relu | gated | jumprelu | matryoshka | crosscoder (BatchTopK, M models)
            | crosscoder_l1.
        d_sae: number of latents (default: expansion_factor x d_in).
        expansion_factor: used when d_sae is not given.
        lr: Adam learning rate (default: 2e-4 / sqrt(d_sae / 2**14)).
        name: export folder and TensorBoard prefix (default: <hook>-<architecture>-<d_sae>).
        b_dec_init: b_dec at the start: "mean" of the first batch (Gao et al.'s recipe for model activations) or
            "zeros" (SAELens's; better where most of the data's mean is features that fire, as in synthetic data).
        shard_latents: under the latent_parallel strategy, split this SAE's latents over the latent group (false:
            every rank of the group holds it whole, as under DDP); no effect under other strategies.
        hook_name_out: a transcoder's output hook: it reads hook_name and predicts this activation of the same
            tokens (e.g. blocks.2.hook_mlp_in -> blocks.2.hook_mlp_out); null: an SAE, reconstructing hook_name.
        cross_layer: a cross-layer transcoder over the layers from hook_name (blocks.a.hook_mlp_in) to hook_name_out
            (blocks.b.hook_mlp_out): layer l's d_sae latents read its MLP input and write the MLP outputs of l..b.
    """

    hook_name: str = "blocks.0.hook_resid_post"
    architecture: Architecture = "topk"
    d_sae: int | None = None
    expansion_factor: float = 8.0
    lr: float | None = None
    name: str | None = None
    b_dec_init: Literal["mean", "zeros"] = "mean"
    shard_latents: bool = True
    hook_name_out: str | None = None
    cross_layer: bool = False

    def __post_init__(self):
        if self.cross_layer and (self.hook_name_out is None or self.architecture not in CLT_ARCHITECTURES):
            raise SAELightningError("a cross-layer transcoder needs hook_name blocks.a.hook_mlp_in, hook_name_out "
                                    f"blocks.b.hook_mlp_out and an architecture of {', '.join(CLT_ARCHITECTURES)}")
        if self.hook_name_out is not None and self.hook_name_out == self.hook_name:
            raise SAELightningError(f"hook_name_out equals hook_name ({self.hook_name}): a transcoder predicts another "
                                    "hook point; drop hook_name_out to train an SAE")
        if self.skip_connection and self.hook_name_out is None:
            raise SAELightningError("skip_connection applies to transcoders only; set hook_name_out "
                                    "(e.g. blocks.2.hook_mlp_out) or drop skip_connection")
        if self.b_dec_init not in ("mean", "zeros"):
            raise SAELightningError(f"b_dec_init={self.b_dec_init!r} must be 'mean' or 'zeros'")
        if self.architecture not in ARCHITECTURES:
            raise SAELightningError(f"unknown SAE architecture {self.architecture!r}; "
                                    f"use one of {', '.join(ARCHITECTURES)}")
        if self.d_sae is not None and (isinstance(self.d_sae, bool) or not isinstance(self.d_sae, int)
                                       or self.d_sae < 1):
            raise SAELightningError(f"d_sae={self.d_sae!r} must be a positive integer "
                                    "(or null: expansion_factor x d_in)")
        if not (math.isfinite(self.expansion_factor) and self.expansion_factor > 0):
            raise SAELightningError(f"expansion_factor={self.expansion_factor} must be a number > 0")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise SAELightningError(f"lr={self.lr} must be a number > 0 (or null for the default)")
        self.check_options_apply(self.architecture)


def _thresholds(value) -> DiffThresholds:
    if value is None:
        return DiffThresholds()
    if isinstance(value, DiffThresholds):
        return value
    if isinstance(value, dict):
        return DiffThresholds(**value)
    raise SAELightningError(f"model.diff_thresholds must be a mapping (exclusive, shared_halfwidth), got {value!r}")


def _as_spec(spec) -> SAESpec:
    if isinstance(spec, SAESpec):
        return spec
    if isinstance(spec, dict):
        spec = dict(spec)
        spec.update(spec.pop("options", None) or {})  # checkpoints of earlier versions kept options in a dict
        known = {f.name for f in dataclasses.fields(SAESpec)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise SAELightningError(f"unknown SAE field(s) {unknown}; an SAE spec takes {sorted(known)}")
        return SAESpec(**spec)
    raise SAELightningError(f"an SAE spec must be a mapping of SAESpec fields, got {type(spec).__name__}")


def _width(hook: str, n_layer: int, d_model: int, hook_widths: dict[str, int] | None) -> int:
    """The width of the hook an SAE reads: a model-free source's, else the nanochat model's (its grammar checked;
    the models of data.models have one width)."""
    hook = hook.split("/", 1)[1] if "/" in hook and not hook_widths else hook
    if hook_widths:
        if hook not in hook_widths:
            raise SAELightningError(f"the training activations have no hook {hook!r} (they hold "
                                    f"{sorted(hook_widths)}); set the SAE's hook_name to one of them")
        return int(hook_widths[hook])
    parse_hook(hook, n_layer)
    return hook_width(hook, n_layer, d_model)


def build_from_spec(spec: SAESpec, d_in: int, n_models: int = 1, d_out: int | None = None):
    """An SAE (untrained) for a spec at a hook point of width d_in (a crosscoder: of each of its n_models models;
    expansion_factor counts one model's width); a transcoder writing width d_out."""
    d_sae = spec.d_sae if spec.d_sae is not None else max(1, int(round(spec.expansion_factor * d_in)))
    sae = build_sae(SAEConfig(architecture=spec.architecture, d_in=d_in * n_models, d_sae=d_sae, n_models=n_models,
                              d_out=d_out, **spec.given_options()))
    if spec.hook_name_out is not None:  # where its output goes: spliced eval and the export read it
        sae.metadata["hook_name_out"] = spec.hook_name_out
    return sae


def rebuild(sae, shard=None):
    """A fresh draw of an SAE, transcoder or cross-layer transcoder like `sae` (its config and metadata), with only
    `shard`'s latents where given (deferred_sae_init: the module draws its SAEs late, in the same order)."""
    if isinstance(sae, CrossLayerTranscoder):
        fresh = CrossLayerTranscoder(sae.config, sae.n_layers)
    else:
        fresh = build_sae(sae.config, shard)
    fresh.metadata.update(sae.metadata)
    return fresh


def input_keys(spec: SAESpec, model_names: list[str] | None) -> list[str]:
    """The activation keys an SAE reads: its hook; a crosscoder's hook in each model ("<model>/<hook>")."""
    if spec.architecture not in CROSSCODERS:
        if model_names and (spec.hook_name_out is not None or spec.cross_layer):
            raise SAELightningError("a transcoder reads one model: train it in a run without data.models (data.model "
                                    "or data.source names the model)")
        if model_names and "/" not in spec.hook_name:
            raise SAELightningError(f"with data.models, an SAE names the model it reads: {model_names[0]}/"
                                    f"{spec.hook_name} (the models are {', '.join(model_names)})")
        return [spec.hook_name]
    if not model_names:
        raise SAELightningError(f"a {spec.architecture} reads two or more models: list them in data.models "
                                "(e.g. [{name: base, source: base}, {name: chat, source: sft}])")
    if "/" in spec.hook_name:
        raise SAELightningError(f"a crosscoder reads its hook in every model: give hook_name without a model "
                                f"({spec.hook_name.split('/', 1)[1]}, not {spec.hook_name})")
    return [f"{m}/{spec.hook_name}" for m in model_names]


def clt_hooks(spec: SAESpec, n_layer: int) -> tuple[list[str], list[str]]:
    """A cross-layer transcoder's input hooks (each layer's MLP input) and output hooks (each layer's MLP output)."""
    first, kind_in = parse_hook(spec.hook_name, n_layer)
    last, kind_out = parse_hook(spec.hook_name_out, n_layer)
    if kind_in != "hook_mlp_in" or kind_out != "hook_mlp_out" or last < first:
        raise SAELightningError(f"a cross-layer transcoder spans blocks.a.hook_mlp_in to blocks.b.hook_mlp_out with "
                                f"a <= b; got {spec.hook_name} -> {spec.hook_name_out}")
    layers = range(first, last + 1)
    return [f"blocks.{i}.hook_mlp_in" for i in layers], [f"blocks.{i}.hook_mlp_out" for i in layers]


def build_clt(spec: SAESpec, n_layer: int, d_model: int) -> CrossLayerTranscoder:
    """A cross-layer transcoder (untrained) for a spec, d_sae latents per layer."""
    ins, outs = clt_hooks(spec, n_layer)
    d_sae = spec.d_sae if spec.d_sae is not None else max(1, int(round(spec.expansion_factor * d_model)))
    clt = CrossLayerTranscoder(SAEConfig(architecture=spec.architecture, d_in=d_model, d_sae=d_sae,
                                         **spec.given_options()), len(ins))
    clt.metadata.update(hook_name_out=spec.hook_name_out, hook_names_in=ins, hook_names_out=outs)
    return clt


def _check_order(spec: SAESpec, n_layer: int) -> None:
    """A transcoder's output hook must come after its input hook in the forward (it replaces what follows)."""
    if spec.hook_name_out is not None and forward_position(spec.hook_name_out, n_layer) <= \
            forward_position(spec.hook_name, n_layer):
        raise SAELightningError(f"hook_name_out {spec.hook_name_out} comes before hook_name {spec.hook_name} in the "
                                "forward; a transcoder predicts a later activation from an earlier one")


class SAEState(nn.Module):
    """The per-SAE training state beside its weights: the dead-latent tracker and the density window.

    since_fired: tokens since each latent last fired (dead = at least the window); initialized: b_dec was
    set from a first batch; window / window_tokens: firing counts and tokens of the density window in
    progress, pooled over ranks; density: the firing frequency of the last completed window (NaN before),
    density_tokens: the tokens it counted (0 before).
    """

    def __init__(self, d_sae: int):
        super().__init__()
        self.register_buffer("since_fired", torch.zeros(d_sae, dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("density", torch.full((d_sae,), float("nan")))
        self.register_buffer("window", torch.zeros(d_sae, dtype=torch.float64))
        self.register_buffer("window_tokens", torch.zeros((), dtype=torch.float64))
        self.register_buffer("density_tokens", torch.zeros((), dtype=torch.float64))

    def track(self, counts: torch.Tensor, step_tokens: torch.Tensor) -> None:
        """A step's firing counts (summed over ranks) and SAE tokens (0 for a skipped step)."""
        self.since_fired += step_tokens.long()
        self.since_fired.masked_fill_(counts > 0, 0)  # not since[fired] = 0: boolean indexing syncs with the host
        self.window += counts
        self.window_tokens += step_tokens

    def latest_density(self) -> tuple[torch.Tensor, int | None]:
        """(firing frequency per latent, tokens it counts): the last completed window's, else the window in
        progress (a run shorter than one window); NaN and 0 before any token. The count is None for a window
        completed before checkpoints recorded it."""
        if bool(torch.isfinite(self.density).all()):
            tokens = float(self.density_tokens)
            return self.density, int(tokens) if math.isfinite(tokens) else None
        return self.window / self.window_tokens, int(self.window_tokens)

    def close_window(self) -> None:
        self.density.copy_(self.window / self.window_tokens)
        self.density_tokens.copy_(self.window_tokens)
        self.window.zero_()
        self.window_tokens.zero_()


# the per-SAE buffers that earlier versions kept on the module as "<buffer>__<sae name>"
_OLD_STATE = ("since_fired", "initialized", "density", "window", "window_tokens")


def upgrade_state_dict(state: dict) -> dict:
    """Rename the buffers of checkpoints written before SAEState and the NonFiniteGuard existed."""
    out = {}
    for key, value in state.items():
        head, sep, name = key.partition("__")
        if sep and head in _OLD_STATE:
            key = f"states.{name}.{head}"
        elif key == "nonfinite_skipped":
            key = "guard.skipped"
        out[key] = value
    for key in list(out):  # written before density_tokens: the count of a completed window is unknown (NaN)
        if key.startswith("states.") and key.endswith(".density") and key + "_tokens" not in out:
            out[key + "_tokens"] = torch.tensor(float("nan"), dtype=torch.float64)
    return out


_DEFER_INIT = contextvars.ContextVar("saelightning_defer_sae_init", default=False)


@contextlib.contextmanager
def deferred_sae_init():
    """SAEModules built inside draw no SAE weights: their SAEs are shapes on the meta device, and configure_model
    draws them from the random state the module was built in, under the latent_parallel strategy each rank only
    its latent shard (the same numbers as those rows of the whole init; no rank ever holds the whole SAE). The
    CLI builds its module so under that strategy."""
    token = _DEFER_INIT.set(True)
    try:
        yield
    finally:
        _DEFER_INIT.reset(token)


class SAEModule(pl.LightningModule):
    """Trains the SAEs in `saes` on the activation stream of ActivationDataModule.

    Args:
        saes: the SAEs to train (one model forward serves them all).
        n_layer: the nanochat model's depth (linked from the data module by the CLI).
        d_model: the nanochat model's width (linked from the data module by the CLI).
        model_info: the nanochat model's path/step/era/config (linked; recorded in exports).
        hook_widths: a model-free source's hook names and widths (linked; None: the nanochat model's hooks).
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
            per val batch). Not with data.models (crosscoders): their validation gives the reconstruction figures.
        model_names: the names of data.models (linked from data; None: one model).
        diff_thresholds: a crosscoder's Δ classes (modeldiff.DiffThresholds: exclusive, shared_halfwidth), logged
            at each validation (diff/*) and written into its export.
    """

    def __init__(self, saes: list[SAESpec] | None = None, n_layer: int = 0, d_model: int = 0,
                 model_info: dict | None = None, warmup_steps: int = 1000, decay_steps: int = 0,
                 lr_end_factor: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 6.25e-10,
                 grad_clip: float | None = 1.0, dead_window_tokens: int = 10_000_000, max_nonfinite_steps: int = 10,
                 spliced_eval: bool = True, hook_widths: dict[str, int] | None = None,
                 model_names: list[str] | None = None, diff_thresholds: DiffThresholds | None = None):
        super().__init__()
        specs = [_as_spec(s) for s in (saes or [SAESpec()])]
        if not hook_widths and (n_layer < 1 or d_model < 1):
            raise SAELightningError("SAEModule needs n_layer and d_model of the nanochat model, or a model-free "
                                    "source's hook_widths (the CLI links them from data)")
        self.save_hyperparameters({
            "saes": [dataclasses.asdict(s) for s in specs], "n_layer": n_layer, "d_model": d_model,
            "hook_widths": dict(hook_widths) if hook_widths else None,
            "model_info": model_info or {}, "warmup_steps": warmup_steps, "decay_steps": decay_steps,
            "lr_end_factor": lr_end_factor, "betas": list(betas), "eps": eps, "grad_clip": grad_clip,
            "dead_window_tokens": dead_window_tokens, "max_nonfinite_steps": max_nonfinite_steps,
            "spliced_eval": spliced_eval, "model_names": list(model_names) if model_names else None,
            "diff_thresholds": dataclasses.asdict(_thresholds(diff_thresholds)),
        })
        self.model_names = list(model_names) if model_names else None
        self.diff_thresholds = _thresholds(diff_thresholds)
        self.keys: dict[str, list[str]] = {}  # each SAE's input keys (a crosscoder: its hook in each model)
        self.model_info = model_info or {}
        self.saes, self.states = nn.ModuleDict(), nn.ModuleDict()
        self.specs: dict[str, SAESpec] = {}
        # deferred_sae_init: where the SAEs' draws start (configure_model makes them); None: drawn here
        self._init_rng = torch.get_rng_state() if _DEFER_INIT.get() else None
        for spec in specs:
            keys = input_keys(spec, self.model_names)
            with torch.device("meta") if self._init_rng is not None else contextlib.nullcontext():
                if spec.cross_layer:
                    if hook_widths:
                        raise SAELightningError("a cross-layer transcoder reads a nanochat model's MLPs; train it on "
                                                "the model (or its cache), not on data.activations or data.synthetic")
                    sae = build_clt(spec, n_layer, d_model)
                    keys = sae.hook_names_in
                else:
                    n_models = len(keys) if spec.architecture in CROSSCODERS else 1
                    d_out = None if spec.hook_name_out is None else _width(spec.hook_name_out, n_layer, d_model,
                                                                           hook_widths)
                    if d_out is not None and not hook_widths:
                        _check_order(spec, n_layer)
                    sae = build_from_spec(spec, _width(keys[0], n_layer, d_model, hook_widths), n_models, d_out)
            kind = "clt-" if spec.cross_layer else ""
            default = f"{re.sub(r'[^A-Za-z0-9_-]', '_', spec.hook_name)}-{kind}{spec.architecture}-{sae.config.d_sae}"
            name = spec.name or default
            if not _NAME.match(name) or name in self.saes:
                raise SAELightningError(f"SAE name {name!r} is invalid or repeated; "
                                        "use unique names of letters, digits, _ and -")
            self.saes[name], self.specs[name], self.states[name] = sae, spec, SAEState(sae.n_latents)
            self.keys[name] = keys
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))  # SAE training tokens, all ranks
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        self._initialized: set[str] = set()  # SAEs known initialised (read from the buffer once, not every step)
        # a transcoder's metrics are of its output (what it predicts), width d_out
        self.train_metrics = nn.ModuleDict({n: SAEMetrics(s.out_width, s.n_latents, False)
                                            for n, s in self.saes.items()})
        self.val_metrics = nn.ModuleDict({n: SAEMetrics(s.out_width, s.n_latents, spliced_eval)
                                          for n, s in self.saes.items()})
        # a crosscoder's reconstruction of each of its models, logged as val/explained_variance/<model>, ...
        self.model_metrics = nn.ModuleDict({
            n: nn.ModuleList([ReconstructionMetrics(s.d_model) for _ in range(s.n_models)])
            for n, s in self.saes.items() if self.is_crosscoder(n)})
        # against a synthetic source's true features (states are sums, not part of the checkpoint)
        self.truth_metrics = nn.ModuleDict({n: GroundTruthMetrics(s.n_latents) for n, s in self.saes.items()})
        self._truth_on = False  # this validation has true features to compare with
        self.density_step = -1  # global step of the last completed density window (callbacks watch it)
        self.last_val_step: int | None = None  # global step of the last validation (its metrics go into exports)
        self._clock: tuple[float, int] | None = None
        self.start_step: int | None = None  # the step training started at in this process (None: not started)
        self._val_stopped = False  # a stop signal came during this validation: its partial figures are dropped

    # --- facts other parts read ---

    @property
    def hook_names(self) -> list[str]:
        """Every activation key the SAEs read or (transcoders) predict: one model forward captures them all."""
        keys = []
        for name, sae in self.saes.items():
            keys += self.keys[name]
            if isinstance(sae, CrossLayerTranscoder):
                keys += sae.hook_names_out
            elif self.specs[name].hook_name_out:
                keys.append(self.specs[name].hook_name_out)
        return list(dict.fromkeys(keys))

    def sae_input(self, name: str, acts: dict[str, torch.Tensor]) -> torch.Tensor:
        """SAE `name`'s input from a batch's activations: its hook's, or a crosscoder's models side by side."""
        keys = self.keys[name]
        return acts[keys[0]] if len(keys) == 1 else torch.cat([acts[k] for k in keys], -1)

    def sae_scale(self, name: str, scales: dict) -> torch.Tensor:
        """SAE `name`'s input scale: one constant, or one per model for a crosscoder."""
        values = [float(scales[k]) for k in self.keys[name]]
        return torch.tensor(values[0] if len(values) == 1 else values, dtype=torch.float32)

    def is_crosscoder(self, name: str) -> bool:
        return self.specs[name].architecture in CROSSCODERS

    def target_hook(self, name: str) -> str:
        """The key whose activations SAE `name` is scored against: a transcoder's output hook, or what it reads."""
        return self.specs[name].hook_name_out or self.keys[name][0]

    def sae_target(self, name: str, acts: dict[str, torch.Tensor]) -> torch.Tensor:
        """What SAE `name` writes, from a batch's activations: a transcoder's output hook's, else its input."""
        return acts[self.target_hook(name)] if self.saes[name].config.is_transcoder else self.sae_input(name, acts)

    def prefix(self, name: str) -> str:
        return f"{name}/" if len(self.saes) > 1 else ""

    def since_fired(self, name: str) -> torch.Tensor:
        return self.states[name].since_fired

    def dead_mask(self, name: str) -> torch.Tensor:
        return self.since_fired(name) >= self.hparams.dead_window_tokens

    def density(self, name: str) -> torch.Tensor:
        """Firing frequency per latent over the last completed window of dead_window_tokens (NaN before one)."""
        return self.states[name].density

    def world_batch(self, batch_tokens: int) -> int:
        return batch_tokens * self._data_parallel_size()  # the ranks of a latent group read the same batch

    @property
    def nonfinite_skipped(self) -> torch.Tensor:
        return self.guard.skipped

    def groups(self) -> dict[str, list]:
        """{hook: [sae, ...]} in the order of self.saes (the layout evaluate_batch takes)."""
        out: dict[str, list] = {}
        for name, sae in self.saes.items():
            out.setdefault(self.specs[name].hook_name, []).append(sae)
        return out

    def on_train_start(self) -> None:
        self.start_step = self.global_step

    # --- latent parallelism (parallel.LatentParallelStrategy) ---

    def configure_model(self) -> None:
        """Under the latent_parallel strategy, keep this rank's shard of each SAE whose spec shards latents (and
        its trackers); Lightning calls this once the process groups exist, before a checkpoint is restored. SAEs
        deferred by deferred_sae_init are drawn here: only the shard where there is one."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        latent = getattr(strategy, "latent_parallel_size", 1) > 1
        if self._init_rng is not None:
            self._draw_saes(strategy if latent else None)
        if not latent:
            return
        for name, sae in self.saes.items():
            if self.specs[name].shard_latents and sae.shard is None:
                sae.shard_latents(strategy.latent_shard(sae.config.d_sae))
                self.states[name] = SAEState(sae.shard.d_local).to(sae.W_enc.device)

    def _draw_saes(self, strategy) -> None:
        """The deferred SAEs, in order, from the random state of construction (then where the whole draws leave
        it), on the CPU as an undeferred module draws them; each shard-latents SAE only its shard under `strategy`."""
        rng, self._init_rng = self._init_rng, None
        torch.set_rng_state(rng)
        for name, sae in self.saes.items():
            shard = strategy.latent_shard(sae.config.d_sae) if strategy is not None and \
                self.specs[name].shard_latents else None
            with torch.device("cpu"):
                self.saes[name] = rebuild(sae, shard)
                if shard is not None:
                    self.states[name] = SAEState(shard.d_local)

    @property
    def sharded(self) -> list[str]:
        return [name for name, sae in self.saes.items() if sae.shard is not None]

    def _data_group(self):
        """The process group whose ranks read different batches (None: all ranks)."""
        return getattr(self._trainer.strategy, "data_group", None) if self._trainer is not None else None

    def _data_parallel_size(self) -> int:
        if self._trainer is None:
            return 1
        return getattr(self.trainer.strategy, "data_parallel_size", self.trainer.world_size)

    def _shard_keys(self, name: str) -> list[str]:
        sae = self.saes[name]
        return [f"saes.{name}.{p}" for p in sae.sharded_names()] + \
            [f"states.{name}.{b}" for b in ("since_fired", "density", "window")]

    def split_latent_shards(self, checkpoint: dict) -> dict | None:
        """Take this rank's sharded tensors (parameters, their Adam state, per-latent trackers) out of a checkpoint
        dict; None when no SAE is sharded."""
        if not self.sharded:
            return None
        state = checkpoint["state_dict"]
        tensors = {key: state.pop(key) for name in self.sharded for key in self._shard_keys(name)}
        moments = {}
        for opt_state in checkpoint.get("optimizer_states", []):
            for index in self._sharded_param_indices():
                if index in opt_state["state"]:
                    moments[index] = opt_state["state"].pop(index)
        return {"state_dict": tensors, "optimizer_state": moments}

    def merge_latent_shards(self, checkpoint: dict, shard: dict) -> None:
        checkpoint["state_dict"].update(shard["state_dict"])
        for opt_state in checkpoint.get("optimizer_states", []):
            opt_state["state"].update(shard["optimizer_state"])

    def _sharded_param_indices(self) -> list[int]:
        """Indices, in the optimizer's state, of the sharded parameters (configure_optimizers' order)."""
        out, index = [], 0
        for sae in self.saes.values():
            sharded = {id(getattr(sae, n)) for n in sae.sharded_names()}
            for param in sae.parameters():
                if id(param) in sharded:
                    out.append(index)
                index += 1
        return out

    def whole(self, name: str):
        """(the whole SAE, its latest density and the tokens it counts) for the export; a collective over the
        latent group for a sharded SAE (every rank calls it, in the same order)."""
        sae, state = self.saes[name], self.states[name]
        density, tokens = state.latest_density()
        if sae.shard is None:
            return sae, density, tokens
        return sae.gathered(), all_gather_cat(density.contiguous(), sae.shard, 0), tokens

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
        """Clip each SAE's gradient on its own (one SAE of a sweep never scales another's step) and hand SkipAdam
        each SAE's skip flag (gradients are synced by now, so every rank flags the same). No host sync."""
        for name, sae in self.saes.items():
            clip = self.hparams.grad_clip * sae.grad_clip_scale() if self.hparams.grad_clip else math.inf
            flag = self.guard.gradient_flag(name, sae.clip_grad_norm(clip))
            if isinstance(optimizer, SkipAdam):
                optimizer.skip[name] = flag
        self.guard.count_gradient_skips()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        for name, sae in self.saes.items():
            sae.after_optimizer_step(self.guard.update_flag(name))

    # --- training ---

    def _prepare(self, name: str, sae, x, scales: dict, y) -> None:
        """Set the SAE's scales and, once, b_dec (x, y: a cross-layer transcoder's lists of inputs and targets)."""
        self._fill_scales(name, sae, scales)
        if name in self._initialized:
            return
        initialized = self.states[name].initialized
        if not initialized:  # a host sync, once per SAE and run
            bad = not all(bool(torch.isfinite(t).all()) for t in (x if isinstance(x, list) else [x]) +
                          (y if isinstance(y, list) else [y]))
            if self.trainer.strategy.reduce_boolean_decision(bad, all=False):
                return  # never initialised from a bad batch: this step is skipped, the next good one initialises
            if self.specs[name].b_dec_init == "mean":
                sae.init_from_batch(y)  # b_dec is in the output space: the mean of what the SAE writes
            if dist.is_available() and dist.is_initialized():  # every rank starts from rank 0's init
                sharded = {id(getattr(sae, n)) for n in sae.sharded_names()}
                group = self._data_group()
                for t in list(sae.parameters()) + list(sae.buffers()):
                    if id(t) in sharded:  # a shard: from the first rank of this rank's data group
                        dist.broadcast(t.data, dist.get_global_rank(group, 0), group=group)
                    else:
                        dist.broadcast(t.data, 0)
            initialized.fill_(True)
        self._initialized.add(name)

    def _sum_over_ranks(self, tensor: torch.Tensor, group=None) -> torch.Tensor:
        """Sum over ranks (of `group`; None: all), in place, with one all-reduce. Not Lightning's strategy.reduce:
        it puts a barrier first, and an NCCL barrier makes the host wait for the GPU. Every rank calls this in the
        same order."""
        if self._trainer is not None and self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The SAEs' summed loss. A step the guard flags (NaN/inf on any rank) is skipped without a host sync:
        backward still runs, but SkipAdam leaves every SAE as it was, and the trackers and token count take
        nothing from it."""
        acts = batch["acts"]
        self.guard.start(acts, self.saes)
        total, outputs = 0.0, {}
        for name, sae in self.saes.items():
            if isinstance(sae, CrossLayerTranscoder):
                xs, ys = [acts[h] for h in sae.hook_names_in], [acts[h] for h in sae.hook_names_out]
                self._prepare(name, sae, xs, batch["scales"], ys)
                sae.set_training_step(self.global_step)
                preds, latents, losses = sae(xs, ys, sparse=True)
                outputs[name] = (torch.cat(ys, -1), torch.cat(preds, -1), sae.concat_latents(latents), losses)
                total = total + losses["loss"]
                continue
            x, y = self.sae_input(name, acts), self.sae_target(name, acts)
            self._prepare(name, sae, x, batch["scales"], y)
            sae.set_training_step(self.global_step)
            # k-sparse SAEs hand back (values, indices): nothing in a training step needs dense latents
            extra = {"sparse": True} if sae.sparse_forward else {}
            if sae.config.is_transcoder:
                extra["target"] = y
            outputs[name] = (y, *sae(x, dead_mask=self.dead_mask(name), **extra))
            total = total + outputs[name][-1]["loss"]
        good = self.guard.agree(total, self._sum_over_ranks, self.saes)
        n_tokens = next(iter(acts.values())).shape[0]
        # SAE training tokens of this step over all ranks (0 if skipped)
        step_tokens = good * self.world_batch(n_tokens)
        log_now = self._should_log()
        log_metrics = log_now and not bool(self.guard.step_bad)  # a logging step syncs anyway
        steps_per_window = max(1, math.ceil(self.hparams.dead_window_tokens / self.world_batch(n_tokens)))
        window_ends = (self.global_step + 1) % steps_per_window == 0  # a fixed step count, so ranks agree
        for name, (x, x_hat, latents, losses) in outputs.items():
            # the same tracker on every rank of a data group (over its own latents when sharded)
            counts = self._sum_over_ranks(self.saes[name].shard_firing_counts(latents) * good, self._data_group())
            self.states[name].track(counts, step_tokens)
            if window_ends:
                self.states[name].close_window()
            if log_metrics:  # like SAELens: train metrics of the logged step's batch (the rest would cost every step)
                scale = self._output_scale(name, batch["scales"]).to(x.device)
                full = self.saes[name].full_latents(latents).detach()  # gathered from the shards
                self.train_metrics[name].update(x.detach() / scale, x_hat.detach() / scale, full)
                self._log_train(name, losses)
        if window_ends:
            self.density_step = self.global_step
        self.tokens_seen += step_tokens.long()
        self.guard.finish(self.global_step)
        if log_now:
            self._log_throughput(n_tokens)
        return total

    def _should_log(self) -> bool:
        return (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0

    def _log_train(self, name: str, losses: dict) -> None:
        p, metrics = self.prefix(name), self.train_metrics[name]
        values = {f"{p}losses/{'overall_loss' if k == 'loss' else k}": v.detach() for k, v in losses.items()}
        computed = metrics.compute()  # pooled over ranks
        for key in ("explained_variance", "mse", "l0", "l1"):
            values[f"{p}metrics/{key}"] = computed[key]
        shown = {f"{p}losses/overall_loss", f"{p}metrics/explained_variance", f"{p}metrics/l0"}  # in the fit bar
        dead = self.dead_mask(name).float().mean()
        sae = self.saes[name]
        if sae.shard is not None:  # equal shards: the mean of the shards' fractions
            dead = sum_partials(dead, sae.shard) / sae.shard.size
        values[f"{p}sparsity/dead_fraction"] = dead
        group = next(g for g in self.optimizers().optimizer.param_groups if g["name"] == name)
        values[f"{p}details/current_learning_rate"] = torch.tensor(group["lr"])
        metrics.reset()
        for key, value in values.items():
            self.log(key, value.float(), on_step=True, on_epoch=False, sync_dist=False, prog_bar=key in shown)

    def _log_throughput(self, batch_tokens: int) -> None:
        now, step = time.perf_counter(), self.global_step
        if self._clock is not None and step > self._clock[1]:
            rate = (step - self._clock[1]) * self.world_batch(batch_tokens) / (now - self._clock[0])
            self.log("details/tokens_per_second", rate, on_step=True, on_epoch=False, prog_bar=True)
        self._clock = (now, step)
        self.log("details/n_training_tokens", self.tokens_seen.float(), on_step=True, on_epoch=False)
        self.log("details/nonfinite_skipped", self.guard.skipped.float(), on_step=True, on_epoch=False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the latest logged scalars, so `saelightning export --ckpt` can put them in cfg.json metadata
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
        checkpoint["saelightning_metrics"] = {k: v for k, v in metrics.items() if math.isfinite(v)}
        checkpoint["saelightning_metrics_step"] = self.last_val_step
        # a resume continues this TensorBoard version (one run, one curve)
        logger = self.trainer.logger
        checkpoint["saelightning_log_version"] = logger.version if isinstance(logger, TensorBoardLogger) else None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = upgrade_state_dict(checkpoint["state_dict"])
        self.last_val_step = checkpoint.get("saelightning_metrics_step")

    # --- validation: every metric on the val token rows, with each SAE spliced into the frozen model ---

    def on_validation_epoch_start(self) -> None:
        truth = getattr(self.trainer.datamodule, "truth", None)
        self._truth_on = truth is not None
        if self._truth_on:  # each latent's best-matched true feature, from the decoder as it is now
            for name, sae in self.saes.items():
                self.truth_metrics[name].set_dictionary(sae.gathered().W_dec, truth.features)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The same evaluation as `saelightning eval` (evaluate_batch on the same val rows): the training SAEs
        read the model's raw activations (their input scale applied inside), metrics in raw units. A model-free
        source's batch holds the held-out activations ("acts") themselves, and a synthetic one's their true
        feature activations ("truth"). After a stop signal the remaining batches are skipped (the run saves at the
        next step's end, within seconds)."""
        if stop_requested():
            self._val_stopped = True
            return
        data = self.trainer.datamodule
        if "acts" not in batch and self.model_names:  # data.models: every model on the val tokens, unspliced
            batch = {**batch, "acts": data.capture(batch["tokens"].to(self.device), scaled=False)}
        if "acts" in batch:
            for name, sae in self.saes.items():
                self._fill_scales(name, sae, data.scales)
                x, y = self.sae_input(name, batch["acts"]), self.sae_target(name, batch["acts"])
                f, x_hat = encode_decode(sae, x)
                self.val_metrics[name].update(y, x_hat, f)
                for m, metric in enumerate(self.model_metrics[name] if name in self.model_metrics else []):
                    block = slice(m * sae.d_model, (m + 1) * sae.d_model)
                    metric.update(x[:, block], x_hat[:, block])
                if self._truth_on:  # (a synthetic source's small SAEs: dense latents for the matching)
                    self.truth_metrics[name].update(f.dense() if isinstance(f, SparseLatents) else f, x, x_hat,
                                                    batch["truth"])
            return
        groups = self.groups()
        metrics = {hook: [self.val_metrics[n] for n in self.saes if self.specs[n].hook_name == hook] for hook in groups}
        for name, sae in self.saes.items():
            self._fill_scales(name, sae, data.scales)
        evaluate_batch(data.model, groups, batch["tokens"].to(self.device), data.tokenizer.bos_id, metrics,
                       spliced=self.hparams.get("spliced_eval", True))

    def _fill_scales(self, name: str, sae, scales: dict) -> None:
        if isinstance(sae, CrossLayerTranscoder):
            ins, outs = [scales[h] for h in sae.hook_names_in], [scales[h] for h in sae.hook_names_out]
            if getattr(sae, "_filled", None) != (ins, outs):  # a host-to-device copy: once a run, not every step
                for buffer, values in ((sae.input_scales, ins), (sae.output_scales, outs)):
                    buffer.copy_(torch.tensor(values, dtype=buffer.dtype))
                sae._filled = (ins, outs)
            return
        sae.input_scale.copy_(self.sae_scale(name, scales))
        if sae.config.is_transcoder:
            sae.output_scale.fill_(scales[self.target_hook(name)])

    def _output_scale(self, name: str, scales: dict) -> torch.Tensor:
        """The scale of what SAE `name` predicts: a scalar, or per column for a cross-layer transcoder."""
        sae = self.saes[name]
        if isinstance(sae, CrossLayerTranscoder):
            return torch.tensor([scales[h] for h in sae.hook_names_out]).repeat_interleave(sae.d)
        if sae.config.is_transcoder:
            return torch.tensor(float(scales[self.target_hook(name)]))
        return sae.input_scales().detach().cpu()  # a crosscoder's: one per channel

    def on_validation_epoch_end(self) -> None:
        stopped, self._val_stopped = self._val_stopped, False
        if self.trainer.strategy.reduce_boolean_decision(stopped, all=False):  # every rank drops it, or none
            for metrics in list(self.val_metrics.values()) + list(self.truth_metrics.values()) + \
                    [m for group in self.model_metrics.values() for m in group]:
                metrics.reset()
            return
        for name in self.saes:
            metrics, p = self.val_metrics[name], self.prefix(name)
            values = {f"{p}val/{k}": v.float() for k, v in metrics.compute().items() if k != "n_tokens"}
            metrics.reset()
            if self._truth_on:  # mcc, uniqueness, classification/*, shrinkage, dead_latents, true_l0
                values.update({f"{p}val/{k}": v.float() for k, v in self.truth_metrics[name].compute().items()})
                self.truth_metrics[name].reset()
            if self.is_crosscoder(name):
                values.update(self._log_diff(name))
                for model_name, metric in zip(self.model_names, self.model_metrics[name]):
                    values.update({f"{p}val/{k}/{model_name}": v.float() for k, v in metric.compute().items()
                                   if k in ("explained_variance", "mse", "cossim")})
                    metric.reset()
            self.log_dict(values, sync_dist=False)  # pooled over ranks by the metrics themselves
        self.last_val_step = self.global_step

    def _log_diff(self, name: str) -> dict[str, torch.Tensor]:
        """A crosscoder's Δ between its first two models: the histogram (TensorBoard) and the class counts."""
        sae, p = self.saes[name], self.prefix(name)
        delta = relative_norms(sae, 0, 1)
        for experiment in (getattr(lg, "experiment", None) for lg in (self.loggers if self._trainer else [])):
            if self.trainer.is_global_zero and hasattr(experiment, "add_histogram"):
                experiment.add_histogram(f"{p}diff/relative_decoder_norm", delta.cpu(), self.global_step)
        counts = class_counts(classify(delta, self.diff_thresholds))
        names = tuple(self.model_names[:2])
        return {f"{p}diff/{class_name(k, names)}": torch.tensor(float(v)) for k, v in counts.items()}
