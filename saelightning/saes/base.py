"""The shared SAE base: config, parameters, scale folding, decoder-norm constraint, export hooks.

Conventions (every architecture):
  x        [N, d_in] activations in the space the SAE was trained in (the trainer feeds s·raw);
  encode   latents f [N, d_sae] (dense, zeros where inactive);
  decode   x̂ = f W_dec + b_dec;
  forward  (x̂, f, losses) with losses["loss"] the total to backprop; "mse_loss" (E||x - x̂||² / d_in)
           and "fvu" (Σ||x - x̂||² / Σ||x - mean x||², the normalised MSE of Gao et al.) are logged
           for every architecture, plus the architecture's own terms.

A transcoder (d_out set) is the same module reading x [N, d_in] at one hook point and predicting y [N, d_out]
at another: W_dec [d_sae, d_out], b_dec [d_out], forward(x, target=y) scores ŷ against y, and the encoder never
subtracts b_dec (it lives in the output space). A skip transcoder (Paulo et al. 2025) adds a learned linear map
of the input, ŷ = f W_dec + b_dec + x W_skipᵀ, W_skip [d_out, d_in] starting at zero (SAELens's layout).
"""

import copy
import math
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
from torch import nn

from saelightning.errors import SAELightningError
from saelightning.saes.latent import (
    LATENT_AXES,
    LatentShard,
    all_gather_cat,
    copy_to_shards,
    gather_dense,
    gather_sparse,
    sum_partials,
)
from saelightning.saes.sparse import SparseLatents, dense_to_sparse

ARCHITECTURES = ("topk", "batchtopk", "relu", "gated", "jumprelu", "matryoshka", "crosscoder", "crosscoder_l1")
TOPK_STYLE = ("topk", "batchtopk", "matryoshka", "crosscoder")  # k-sparse: sparse decode, AuxK
CROSSCODERS = ("crosscoder", "crosscoder_l1")  # M models -> one latent space (saes/crosscoder.py)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


# each architecture's own options (every architecture also takes COMMON_OPTIONS)
ARCHITECTURE_OPTIONS = {
    "topk": ("k", "k_aux", "aux_coefficient"),
    "batchtopk": ("k", "k_aux", "aux_coefficient", "threshold_ema"),
    "matryoshka": ("k", "k_aux", "aux_coefficient", "threshold_ema", "matryoshka_prefixes"),
    "relu": ("l1_coefficient", "l1_warmup_steps"),
    "crosscoder": ("k", "k_aux", "aux_coefficient", "threshold_ema"),
    "crosscoder_l1": ("l1_coefficient", "l1_warmup_steps"),
    "gated": ("l1_coefficient", "l1_warmup_steps"),
    "jumprelu": ("l0_coefficient", "l1_warmup_steps", "sparsity_penalty", "tanh_scale", "preact_coefficient",
                 "threshold_init", "bandwidth"),
}
COMMON_OPTIONS = ("normalize_decoder", "decoder_init_norm", "apply_b_dec_to_input", "dtype", "skip_connection")
TRANSCODER_ARCHITECTURES = ("topk", "batchtopk", "relu", "jumprelu", "matryoshka")  # SAELens has no gated one
# what an option left at None means
OPTION_DEFAULTS = {"k": 32, "aux_coefficient": 1 / 32, "l1_coefficient": 5.0, "l1_warmup_steps": 1000,
                   "l0_coefficient": 1.0, "sparsity_penalty": "l0", "tanh_scale": 4.0, "preact_coefficient": 0.0,
                   "threshold_init": 0.01, "bandwidth": 0.05, "threshold_ema": 0.99, "apply_b_dec_to_input": True,
                   "dtype": "float32", "skip_connection": False}


@dataclass
class SAEOptions:
    """An SAE's architecture options; None means the architecture's default (the value in brackets).

    Args:
        k: topk: active latents per token; batchtopk/matryoshka/crosscoder: mean active per token [32].
        k_aux: AuxK: dead latents that reconstruct the residual [d_in // 2].
        aux_coefficient: AuxK loss weight (Gao et al. 2024) [1/32].
        l1_coefficient: relu, gated, crosscoder_l1: lambda of the decoder-norm weighted L1 penalty [5.0].
        l1_warmup_steps: relu, gated, jumprelu: the penalty's lambda ramps linearly from 0 over these steps [1000].
        l0_coefficient: jumprelu: lambda of the L0 (or tanh) penalty [1.0].
        sparsity_penalty: jumprelu: "l0" (step, Gemma Scope) or "tanh" (Anthropic 2025) [l0].
        tanh_scale: jumprelu tanh penalty: c in tanh(c * f * ||W_dec,i||) [4.0].
        preact_coefficient: jumprelu: Anthropic's pre-activation loss reviving dead latents; 0 = off [0.0].
        threshold_init: jumprelu: initial per-latent threshold theta [0.01].
        bandwidth: jumprelu: width epsilon of the straight-through rectangle kernel [0.05].
        threshold_ema: batchtopk/matryoshka/crosscoder: EMA decay of the inference threshold, after a (1+n)/(10+n)
            warm-up [0.99].
        matryoshka_prefixes: matryoshka: nested dictionary sizes ending at d_sae [d_sae/16, /8, /4, /2, 1].
        normalize_decoder: unit-norm decoder rows [per architecture: all but relu, tanh-jumprelu and the
            crosscoders, whose per-model decoder norms are what model diffing reads].
        decoder_init_norm: decoder row norm at init (a crosscoder: each model's part of the row) [1 with unit-norm
            rows, else 0.1].
        apply_b_dec_to_input: subtract b_dec before encoding (SAELens's key of that name) [true; crosscoders false;
            transcoders: false, the only value they take].
        dtype: parameter dtype [float32].
        skip_connection: transcoders: a learned linear skip W_skip from input to output (Paulo et al. 2025) [false].
    """

    k: int | None = None
    k_aux: int | None = None
    aux_coefficient: float | None = None
    l1_coefficient: float | None = None
    l1_warmup_steps: int | None = None
    l0_coefficient: float | None = None
    sparsity_penalty: Literal["l0", "tanh"] | None = None
    tanh_scale: float | None = None
    preact_coefficient: float | None = None
    threshold_init: float | None = None
    bandwidth: float | None = None
    threshold_ema: float | None = None
    matryoshka_prefixes: list[int] | None = None
    normalize_decoder: bool | None = None
    decoder_init_norm: float | None = None
    apply_b_dec_to_input: bool | None = None
    dtype: Literal["float32", "bfloat16", "float16", "float64"] | None = None
    skip_connection: bool | None = None

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(SAEOptions)]

    def given_options(self) -> dict:
        """The options set (not None)."""
        return {name: getattr(self, name) for name in self.option_names() if getattr(self, name) is not None}

    def check_options_apply(self, architecture: str) -> None:
        """Refuse an option that the architecture does not read (a typo'd recipe would train silently)."""
        own = ARCHITECTURE_OPTIONS.get(architecture, ())
        foreign = [name for name in self.given_options() if name not in own + COMMON_OPTIONS]
        if foreign:
            _bad(f"{', '.join(foreign)} do(es) not apply to architecture {architecture!r}; its options are "
                 f"{', '.join(own + COMMON_OPTIONS)}")


@dataclass
class SAEConfig(SAEOptions):
    """The whole configuration of one SAE: its architecture, sizes and options (None resolved to the defaults)."""

    architecture: str = "topk"  # one of ARCHITECTURES
    d_in: int = 768  # width of the hooked activation (a crosscoder: of its M models' activations side by side)
    d_sae: int = 16384  # number of latents (dictionary size)
    n_models: int = 1  # a crosscoder: the models it reads (d_in = n_models x one model's width)
    d_out: int | None = None  # a transcoder's output width (None: an SAE, reconstructing its input)

    def __post_init__(self):
        if self.apply_b_dec_to_input is None and self.architecture in CROSSCODERS:
            self.apply_b_dec_to_input = False  # Anthropic's and science-of-finetuning's crosscoders encode x itself
        if self.d_out is not None:
            self._check_transcoder()
        for name, value in OPTION_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.architecture not in ARCHITECTURES:
            _bad(f"unknown SAE architecture {self.architecture!r}; use one of {', '.join(ARCHITECTURES)}")
        for name in ("d_in", "d_sae", "n_models"):
            _positive_int(name, getattr(self, name))
        if self.architecture in CROSSCODERS and (self.n_models < 2 or self.d_in % self.n_models):
            _bad(f"a {self.architecture} reads n_models >= 2 models of one width (d_in = n_models x width); "
                 f"got n_models={self.n_models}, d_in={self.d_in}: give the data module two or more models")
        if self.architecture not in CROSSCODERS and self.n_models != 1:
            _bad(f"n_models={self.n_models} applies to crosscoders only; use architecture crosscoder or crosscoder_l1")
        if self.architecture in TOPK_STYLE:
            _positive_int("k", self.k)
            if self.k >= self.d_sae:
                _bad(f"k={self.k} must be smaller than d_sae={self.d_sae}; lower k or widen the SAE")
        if self.k_aux is not None:
            _positive_int("k_aux", self.k_aux)
        for name in ("aux_coefficient", "l1_coefficient", "l0_coefficient", "preact_coefficient", "threshold_init"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                _bad(f"{name}={getattr(self, name)} must be a finite number >= 0")
        if not isinstance(self.l1_warmup_steps, int) or self.l1_warmup_steps < 0:
            _bad(f"l1_warmup_steps={self.l1_warmup_steps} must be an integer >= 0")
        for name in ("bandwidth", "tanh_scale"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                _bad(f"{name}={getattr(self, name)} must be a finite number > 0")
        if not 0.0 <= self.threshold_ema < 1.0:
            _bad(f"threshold_ema={self.threshold_ema} must be in [0, 1)")
        if self.sparsity_penalty not in ("l0", "tanh"):
            _bad(f"sparsity_penalty={self.sparsity_penalty!r} must be 'l0' or 'tanh'")
        if self.decoder_init_norm is not None and not self.decoder_init_norm > 0:
            _bad(f"decoder_init_norm={self.decoder_init_norm} must be > 0 (or null for the default)")
        if self.dtype not in DTYPES:
            _bad(f"dtype={self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if self.architecture == "matryoshka":
            self._check_prefixes()
        if self.skip_connection and not self.is_transcoder:
            _bad("skip_connection applies to transcoders only; give the SAE an output hook (hook_name_out) or drop it")

    def _check_transcoder(self):
        _positive_int("d_out", self.d_out)
        if self.architecture not in TRANSCODER_ARCHITECTURES:
            _bad(f"architecture {self.architecture!r} has no transcoder form; use one of "
                 f"{', '.join(TRANSCODER_ARCHITECTURES)}")
        if self.apply_b_dec_to_input:
            _bad("apply_b_dec_to_input must be false for a transcoder (b_dec is in its output space); drop it")
        self.apply_b_dec_to_input = False

    @property
    def is_transcoder(self) -> bool:
        return self.d_out is not None

    @property
    def out_width(self) -> int:
        """The width of what the decoder writes: d_out for a transcoder, else d_in."""
        return self.d_out if self.d_out is not None else self.d_in

    def _check_prefixes(self):
        prefixes = self.prefixes
        if any(not isinstance(p, int) or p <= 0 for p in prefixes) or prefixes != sorted(set(prefixes)):
            _bad(f"matryoshka_prefixes={prefixes} must be strictly increasing positive integers")
        if prefixes[-1] != self.d_sae:
            _bad(f"matryoshka_prefixes must end at d_sae={self.d_sae}, got {prefixes}; append {self.d_sae}")

    @property
    def prefixes(self) -> list[int]:
        if self.matryoshka_prefixes is not None:
            return list(self.matryoshka_prefixes)
        sizes = [self.d_sae // 2**i for i in (4, 3, 2, 1)] + [self.d_sae]
        return sorted({s for s in sizes if s > 0})

    @property
    def unit_norm_decoder(self) -> bool:
        if self.normalize_decoder is not None:
            return self.normalize_decoder
        # Anthropic's recipes (relu, tanh-JumpReLU) weight the penalty by ||W_dec,i|| instead; the gated
        # paper keeps unit norms (a free decoder scale lets its gate and auxiliary loss drift apart)
        if self.architecture == "jumprelu":
            return self.sparsity_penalty == "l0"
        return self.architecture not in ("relu", *CROSSCODERS)

    @property
    def init_norm(self) -> float:
        if self.decoder_init_norm is not None:
            return self.decoder_init_norm
        # a crosscoder's too: each model's part of a row starts at 0.1, so the part of a model a latent is not
        # in starts small (from norm 1, BatchTopK left some A-only planted features at Δ ≈ 0.2: test_crosscoder)
        return 1.0 if self.unit_norm_decoder else 0.1

    @property
    def k_aux_resolved(self) -> int:
        return self.k_aux if self.k_aux is not None else max(1, self.d_in // 2)


def normal_rows(rows: int, cols: int, start: int, count: int, chunk: int = 1 << 22) -> torch.Tensor:
    """Rows [start, start + count) of torch.randn(rows, cols) (float32, CPU, the default generator), holding at most
    about `chunk` values beside them. torch's CPU sampler draws one uniform per value in order and maps each
    aligned block of 16 to normals, then redraws the last 16 when the size is not a multiple of 16; so draws of
    whole blocks (and a last one of at least 16 values) give the same numbers as one draw and leave the generator
    where it leaves it (tests/test_latent_parallel.py checks it on shapes with and without a remainder). Under
    another default device (meta, a GPU) it is the slice of one draw there, as before."""
    if torch.get_default_device().type != "cpu":
        return torch.randn(rows, cols, dtype=torch.float32).narrow(0, start, count).clone()
    step = 16 // math.gcd(cols, 16)  # rows per whole number of 16-value blocks
    per = max(step, chunk // max(cols, 1) // step * step)
    bounds = list(range(0, rows, per))
    if len(bounds) > 1 and (rows - bounds[-1]) * cols < 16:
        bounds.pop()  # a last draw under 16 values would take another path: it joins the one before
    out = torch.empty(count, cols, dtype=torch.float32)
    for i, lo in enumerate(bounds):
        hi = bounds[i + 1] if i + 1 < len(bounds) else rows
        block = torch.randn(hi - lo, cols, dtype=torch.float32)
        a, b = max(lo, start), min(hi, start + count)
        if a < b:
            out[a - start:b - start] = block[a - lo:b - lo]
    return out


def _bad(message: str):
    raise SAELightningError(message)


def _positive_int(name: str, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _bad(f"{name}={value!r} must be a positive integer")


class SAE(nn.Module):
    """Base class: parameters W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out] (d_out = d_in
    for an SAE), and W_skip [d_out, d_in] for a skip transcoder."""

    has_b_enc = True  # the gated SAE has b_gate / b_mag instead
    sparse_forward = False  # True where forward(x, dead_mask, sparse=True) returns SparseLatents (trainer fast path)
    # buffers that a training forward updates (BatchTopK's threshold EMA): a step the trainer skips puts them back
    step_buffers: tuple[str, ...] = ()

    def __init__(self, config: SAEConfig, shard: LatentShard | None = None):
        """A fresh SAE; with `shard`, only that rank's latents, equal to the same rows of the whole SAE's init
        (the generator is drawn as for the whole one and left where it leaves it) without ever holding it."""
        super().__init__()
        self.config = config
        if shard is not None and not self.can_shard:
            self._refuse_sharding()
        dtype, d_out = DTYPES[config.dtype], config.out_width
        start, count = (0, config.d_sae) if shard is None else (shard.offset, shard.d_local)
        W_dec = normal_rows(config.d_sae, d_out, start, count)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * config.init_norm
        self.W_dec = nn.Parameter(W_dec.to(dtype))
        if d_out == config.d_in:
            W_enc = W_dec.T.clone()  # W_enc = W_decᵀ at init
        else:  # a transcoder between widths: encoder columns of the decoder rows' norm, drawn on their own
            W_enc = torch.randn(config.d_in, config.d_sae, dtype=torch.float32)
            W_enc = W_enc / W_enc.norm(dim=0, keepdim=True) * config.init_norm
        self.W_enc = nn.Parameter(W_enc.to(dtype))
        if self.has_b_enc:
            self.b_enc = nn.Parameter(torch.zeros(count, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        if config.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(d_out, config.d_in, dtype=dtype))
        # the trainer's fitted input scale s (so E||s·x||² = d_in); a buffer, so checkpoints keep it
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32))
        if config.is_transcoder:  # and the output's (E||s_out·y||² = d_out): the SAE predicts s_out·y from s_in·x
            self.register_buffer("output_scale", torch.ones((), dtype=torch.float32))
        self.metadata: dict = {}
        self.training_step = 0
        # this rank's part of the latents (None: all of them); set here or by shard_latents
        self.shard: LatentShard | None = shard

    @property
    def n_latents(self) -> int:
        """The number of latents (d_sae, all shards'); a cross-layer transcoder's counts every layer's."""
        return self.config.d_sae

    @property
    def out_width(self) -> int:
        """The width of what the decoder writes: d_out for a transcoder, else d_in (a CLT: every output layer)."""
        return self.config.out_width

    # ---- latent parallelism (saes/latent.py) -------------------------------------------------
    sharded_architecture = True  # False where the architecture has no latent-sharded forward

    @property
    def can_shard(self) -> bool:
        """Whether this SAE has a latent-sharded form: its architecture has one and it is not a transcoder."""
        return self.sharded_architecture and not self.config.is_transcoder

    def _refuse_sharding(self):
        if self.config.is_transcoder:
            _bad("a transcoder has no latent-sharded form; train it replicated (its spec's shard_latents: false)")
        _bad(f"the {self.config.architecture} SAE has no latent-sharded form; train it replicated (its spec's "
             "shard_latents: false) or choose topk, batchtopk, matryoshka, relu or jumprelu")

    @property
    def d_latents(self) -> int:
        """The latents this SAE holds: d_sae, or its shard's d_sae / n."""
        return self.config.d_sae if self.shard is None else self.shard.d_local

    @torch.no_grad()
    def shard_latents(self, shard: LatentShard) -> None:
        """Keep only this rank's latents (W_enc columns, b_enc, W_dec rows, thresholds); the rest is freed."""
        if not self.can_shard:
            self._refuse_sharding()
        keep = slice(shard.offset, shard.offset + shard.d_local)
        for name, axis in LATENT_AXES.items():
            param = getattr(self, name, None)
            if isinstance(param, nn.Parameter) and param.dim() > axis and param.shape[axis] == self.config.d_sae:
                param.data = param.data.narrow(axis, keep.start, shard.d_local).clone()
        self.shard = shard

    def sharded_names(self) -> list[str]:
        """The parameters that hold only this rank's latents (empty when unsharded)."""
        if self.shard is None:
            return []
        return [n for n, axis in LATENT_AXES.items() if isinstance(getattr(self, n, None), nn.Parameter)
                and getattr(self, n).dim() > axis]

    def _encoder_shift(self) -> torch.Tensor:
        """b_dec as the encoder sees it: sharded, every shard's gradient into it is summed."""
        return self.b_dec if self.shard is None else copy_to_shards(self.b_dec, self.shard)

    def _latent_sum(self, t: torch.Tensor) -> torch.Tensor:
        """A sum over latents (a partial reconstruction, a penalty) completed over the shards."""
        return t if self.shard is None else sum_partials(t, self.shard)

    def _local_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Dense latents as this rank decodes them: its own columns of global [N, d_sae] ones."""
        if self.shard is not None and latents.shape[-1] == self.config.d_sae:
            return latents.narrow(-1, self.shard.offset, self.shard.d_local)
        return latents

    def _gathered_dense(self, latents: torch.Tensor) -> torch.Tensor:
        """Dense latents over all d_sae latents from this rank's (an evaluation's encode)."""
        return latents if self.shard is None else gather_dense(latents, self.shard)

    def shard_firing_counts(self, latents) -> torch.Tensor:
        """Tokens in which each of this rank's latents fired ([d_local], float64) from a training forward's latents
        (dense local ones, or sparse ones of own entries with global indices)."""
        if not isinstance(latents, SparseLatents):
            return (latents != 0).sum(0).to(torch.float64)
        if self.shard is None:
            return latents.firing_counts()
        local, mine = self.shard.own(latents.indices)
        fired = ((latents.values != 0) & mine).flatten().to(torch.float64)
        return fired.new_zeros(self.shard.d_local).index_add_(0, local.flatten(), fired)

    def full_latents(self, latents):
        """A training forward's latents over all d_sae latents (gathered from the shards: for metrics)."""
        if self.shard is None:
            return latents
        if not isinstance(latents, SparseLatents):
            return gather_dense(latents, self.shard)
        values, indices, rows = gather_sparse(latents.values, latents.indices, latents.rows, self.shard)
        return SparseLatents(values, indices, self.config.d_sae, rows, latents.n_rows)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """clip_grad_norm_ over this SAE's parameters; sharded, the norm is over all shards (replicated
        parameters counted once)."""
        params = [p for p in self.parameters() if p.grad is not None]
        if self.shard is None:
            return nn.utils.clip_grad_norm_(params, max_norm)
        sharded = {id(getattr(self, n)) for n in self.sharded_names()}
        squares = [p.grad.float().pow(2).sum() for p in params]
        local = sum((s for p, s in zip(params, squares) if id(p) in sharded), torch.zeros(()))
        replicated = sum((s for p, s in zip(params, squares) if id(p) not in sharded), torch.zeros(()))
        total = (sum_partials(local.detach(), self.shard) + replicated).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.dtype))
        return total

    @torch.no_grad()
    def gathered(self) -> "SAE":
        """The whole SAE (every shard's latents, in order) as an ordinary unsharded copy on every rank."""
        if self.shard is None:
            return self
        shard, self.shard = self.shard, None
        try:
            whole = copy.deepcopy(self)
        finally:
            self.shard = shard
        for name in LATENT_AXES:
            param = getattr(whole, name, None)
            if isinstance(param, nn.Parameter) and param.dim() > LATENT_AXES[name]:
                param.data = all_gather_cat(param.data, shard, LATENT_AXES[name])
        return whole

    # ---- encode / decode -------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.config.d_in:
            _bad(f"SAE input has width {x.shape[-1]} but the SAE has d_in={self.config.d_in}; "
                 "use the hook it was trained on")
        return x.to(self.W_enc.dtype)

    def centered(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        return x - self.b_dec if self.config.apply_b_dec_to_input else x

    @property
    def encoder_shift(self) -> torch.Tensor | None:
        """b_dec where the encoder subtracts it from x (the sparse encoder's backward gives it its gradient)."""
        return self._encoder_shift() if self.config.apply_b_dec_to_input else None

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        if self.shard is not None and self.config.apply_b_dec_to_input:
            return (self._check_input(x) - self._encoder_shift()) @ self.W_enc + self.b_enc
        return self.centered(x) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) [N, m] of the nonzero latents, padded with zeros to the row maximum."""
        latents = self.encode(x)
        flat = latents.reshape(-1, latents.shape[-1])
        values, indices = dense_to_sparse(flat)
        return values.reshape(*latents.shape[:-1], -1), indices.reshape(*latents.shape[:-1], -1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._latent_sum(self._local_latents(latents).to(self.W_dec.dtype) @ self.W_dec) + self.b_dec

    def _local_encode(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation's latents of this rank's latents only ([..., d_latents]; the architectures that shard)."""
        raise NotImplementedError

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x̂ = decode(encode(x)) (a transcoder: its prediction ŷ) without side effects (no running statistics move);
        latent-sharded, from this rank's latents summed over the shards, never [N, d_sae]."""
        if self.shard is None:
            return self.output(self.encode(x), x)  # a transcoder's prediction, with its skip term
        return self.decode(self._local_encode(x))

    def encode_decode_sparse(self, x: torch.Tensor) -> tuple[SparseLatents, torch.Tensor]:
        """(latents, x̂) of a latent-sharded SAE for evaluation, x [N, d_in], without [N, d_sae] on any rank: each
        rank's nonzero latents (global indices) gathered as SparseLatents of N·(n·the largest local count) entries
        (padding values 0, which do not fire), x̂ from this rank's latents summed over the shards."""
        local = self._local_encode(x)
        x_hat = self.decode(local)
        values, indices = dense_to_sparse(local.detach())
        values, indices, _ = gather_sparse(values, indices + self.shard.offset, None, self.shard)
        return SparseLatents(values, indices, self.config.d_sae), x_hat

    def with_skip(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x̂ plus a skip transcoder's linear term x W_skipᵀ (x the input, as the encoder reads it); else x̂."""
        if not self.config.skip_connection:
            return x_hat
        return x_hat + x.to(self.W_skip.dtype) @ self.W_skip.T

    def output(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What the SAE writes for input x with these latents: the reconstruction, or a transcoder's prediction."""
        return self.with_skip(self.decode(latents), x)

    def target_of(self, x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """What the losses compare the output with: x for an SAE, the output hook's activation for a transcoder."""
        if not self.config.is_transcoder:
            if target is not None:
                _bad("an SAE reconstructs its input: a target applies to transcoders only (set d_out)")
            return x
        if target is None:
            _bad("a transcoder's forward needs target= (the output hook's activations it predicts)")
        if target.shape[-1] != self.config.d_out or target.shape[:-1] != x.shape[:-1]:
            _bad(f"transcoder target has shape {tuple(target.shape)}, expected {(*x.shape[:-1], self.config.d_out)}; "
                 "pass the output hook's activations of the same tokens")
        return target.to(self.W_dec.dtype)

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None):
        raise NotImplementedError

    # ---- losses shared by all architectures -------------------------------------------------
    def reconstruction_stats(self, x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
        err = (x_hat - x).float().pow(2)
        total_variance = (x - x.mean(0)).float().pow(2).sum().clamp_min(1e-12)
        return {
            "sse": err.sum(-1).mean(),  # E||x - x̂||², the term in the L1/L0 recipes
            "mse_loss": err.mean(),  # SAELens/SAEBench mse: E||x - x̂||² / d_in
            "fvu": err.sum() / total_variance,  # normalised MSE, the TopK recipes' loss
        }

    # the reconstruction term of the loss: "sse" (E||x - x̂||², the L1/L0 recipes) or "fvu" (the TopK family)
    reconstruction_loss = "sse"

    def sparsity_penalty(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss's terms beside the reconstruction, from a forward's losses: its penalty (with its coefficient
        and warm-up) or auxiliary loss. loss = losses[reconstruction_loss] + sparsity_penalty(losses)."""
        raise NotImplementedError

    def grad_clip_scale(self) -> float:
        """How big this SAE's loss is against E||x - x̂||² (SAELens's scale, in which a gradient clip is given).

        The trainer clips at grad_clip * grad_clip_scale(), so one clip value means the same for every
        architecture: 1 here, where the loss is the summed squared error plus a penalty.
        """
        return 1.0

    def penalty_scale(self) -> float:
        """Linear warm-up factor of the sparsity penalty (Anthropic April 2024)."""
        warmup = self.config.l1_warmup_steps
        return 1.0 if warmup == 0 else min(1.0, self.training_step / warmup)

    def decoder_norms(self) -> torch.Tensor:
        return self.W_dec.norm(dim=1)

    # ---- training hooks (called by the LightningModule) ------------------------------------
    def set_training_step(self, step: int) -> None:
        self.training_step = int(step)

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the decoder-gradient component parallel to each row (keeps unit norm to 1st order)."""
        grad = self.W_dec.grad
        if not self.config.unit_norm_decoder or grad is None:
            return
        W = self.W_dec
        parallel = (grad * W).sum(dim=1, keepdim=True) / W.pow(2).sum(dim=1, keepdim=True).clamp_min(1e-12)
        grad.sub_(parallel * W)

    @torch.no_grad()
    def after_optimizer_step(self, skipped: torch.Tensor | None = None) -> None:
        """Put the decoder rows back to unit norm; `skipped` (a 0-dim 0/1 tensor) leaves a skipped step's SAE
        bit for bit as it was, without a host sync (renormalising a unit row again moves its last bits)."""
        if self.config.unit_norm_decoder:
            norm = self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            if skipped is not None:
                norm = torch.where(skipped > 0, torch.ones_like(norm), norm)
            self.W_dec.div_(norm)

    @torch.no_grad()
    def init_from_batch(self, x: torch.Tensor) -> None:
        """b_dec = mean of a first batch (in the space the SAE is trained in): of the targets, for a transcoder."""
        width = self.config.out_width
        if not self.config.is_transcoder:
            x = self._check_input(x)  # a crosscoder's [N, M, d] too
        if x.shape[-1] != width:
            _bad(f"init_from_batch got width {x.shape[-1]}; b_dec has width {width} (a transcoder's: its targets)")
        self.b_dec.copy_(x.to(self.b_dec.dtype).reshape(-1, width).mean(0))

    @torch.no_grad()
    def reinit_latents(self, indices: torch.Tensor, encoder_dirs: torch.Tensor, decoder_dirs: torch.Tensor) -> None:
        """Point latents `indices` at new directions (dead-latent resampling): W_dec rows, W_enc columns, bias 0."""
        self.W_dec[indices] = decoder_dirs.to(self.W_dec.dtype)
        self.W_enc[:, indices] = encoder_dirs.T.to(self.W_enc.dtype)
        self._reset_latent_biases(indices)

    def _reset_latent_biases(self, indices: torch.Tensor) -> None:
        self.b_enc[indices] = 0.0

    # ---- input scale -------------------------------------------------------------------------
    def input_scales(self) -> torch.Tensor:
        """The training scale s of the input (0-dim; a crosscoder: one per channel): it reads s·x."""
        return self.input_scale

    @torch.no_grad()
    def fold_input_scale(self) -> "SAE":
        """A copy that works on raw activations: it computes the same latents on x as self on s·x (and a transcoder's
        prediction of raw y, where self predicts s_out·y)."""
        folded = copy.deepcopy(self)
        s = float(self.input_scale)
        s_out = float(self.output_scale) if self.config.is_transcoder else s
        folded.W_enc.mul_(s)
        folded.W_dec.div_(s_out)  # x̂_raw = x̂_scaled / s
        folded.b_dec.div_(s_out)
        if self.config.skip_connection:
            folded.W_skip.mul_(s / s_out)  # (s·x) W_skipᵀ / s_out
        folded.input_scale.fill_(1.0)
        if self.config.is_transcoder:
            folded.output_scale.fill_(1.0)
        return folded

    # ---- SAELens format (export.py writes and reads these) -----------------------------------
    def saelens_architecture(self) -> str:
        raise NotImplementedError

    def saelens_cfg(self) -> dict:
        """Architecture-specific cfg.json keys."""
        return {}

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        return {**tensors, "W_skip": self.W_skip} if self.config.skip_connection else tensors

    def saelens_shapes(self) -> dict[str, tuple[int, ...]]:
        d_in, d_sae, d_out = self.config.d_in, self.config.d_sae, self.config.out_width
        shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
        return {**shapes, "W_skip": (d_out, d_in)} if self.config.skip_connection else shapes

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            getattr(self, name).copy_(tensor)

    def config_dict(self) -> dict:
        return asdict(self.config)
