"""Synthetic activations with known features, in the manner of SynthSAEBench (SAELens `sae_lens.synthetic`).

A synthetic model is a dictionary of N unit feature directions in d dimensions and a rule for which
features fire on a sample and how strongly. A sample is x = Σ_i a_i f_i + b (+ noise), with
  - firing probabilities p_i Zipfian in the feature index: p = p_min + (p_max - p_min) (r^-α - N^-α) / (1 - N^-α),
    r = i + 1 (feature 0 fires most often);
  - low-rank correlated firing (a Gaussian copula): z = ε Fᵀ + η ⊙ sqrt(1 - ||F_i||²) with ε ~ N(0, I_rank),
    η ~ N(0, I_N), F = scale · N(0, 1) [N, rank]; feature i fires when z_i > Φ⁻¹(1 - p_i); without correlation,
    independently with probability p_i;
  - magnitudes a_i = ReLU(μ_i + σ_i ε), μ linear in the index from magnitude_mean_start to _end, σ_i folded
    normal |N(magnitude_std_mean, magnitude_std_std²)| (drawn once per feature);
  - a hierarchy: a forest of `hierarchy_roots` trees, `hierarchy_branching` children per parent, to depth
    `hierarchy_depth`, the features numbered breadth first from 0 (roots first). A child is active only
    where its parent is; with scale_children_by_parent its magnitude is also multiplied by parent value /
    parent mean. Among the children of a mutually exclusive parent (a `mutually_exclusive` portion of the
    parents) at most one stays active, chosen uniformly. compensate_probabilities raises a child's p by
    1 / p_parent (and by 1 + Σ p_siblings / p_parent under mutual exclusion, clamped at 1) so that its
    effective rate stays near its Zipf rate (SAELens's correction);
  - controlled superposition: N/d sets it, and `orthogonalize_steps` of Adam on Σ_{i≠j} <f_i, f_j>² (rows
    projected back to unit norm after each step) spread the directions apart; the file records the
    achieved mean and max |cos| between features;
  - a bias b of norm `bias_norm`, and isotropic Gaussian noise of standard deviation `noise_std` per dimension.

Seeded and streamed: block g of the training stream is generated from its own seed (data seed, g), so any
block can be regenerated exactly (resume, DDP: ranks read disjoint blocks); the held-out validation set
is blocks of another seed stream (the model's seed), the same for every run on the model. Nothing is
stored but the model: one safetensors file (features, bias, probabilities, magnitudes, hierarchy,
correlation factor), its config and statistics in the file's metadata, so that runs can be compared.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import IterableDataset

from saelightning.atomic import atomic_path
from saelightning.errors import SAELightningError

HOOK = "synthetic"  # the one hook point of a synthetic source (model.saes[i].hook_name)
FORMAT = "saelightning-synthetic-model"
VERSION = 1
TRAIN, VAL, SCALE = 1, 2, 3  # seed streams


@dataclass
class SyntheticConfig:
    """A synthetic model: known feature directions, how they fire and how strongly.

    Args:
        num_features: N, ground-truth features.
        d_in: d, the width of the activations (N / d sets the superposition).
        zipf_exponent: α of the Zipfian firing probabilities over the feature index.
        max_prob: firing probability of feature 0.
        min_prob: firing probability of feature N - 1.
        hierarchy_roots: trees of the hierarchy (0: no hierarchy).
        hierarchy_branching: children per parent.
        hierarchy_depth: levels below the roots (1: roots with leaf children).
        mutually_exclusive: portion of the parents whose children are mutually exclusive.
        compensate_probabilities: raise the children's firing probabilities to offset the gating.
        scale_children_by_parent: a child's magnitude times its parent's value / the parent's mean magnitude.
        correlation_rank: rank of the low-rank firing correlation (0: features fire independently).
        correlation_scale: standard deviation of the correlation factor's entries.
        magnitude_mean_start: mean magnitude of feature 0 (linear in the index to magnitude_mean_end).
        magnitude_mean_end: mean magnitude of feature N - 1.
        magnitude_std_mean: per-feature magnitude std ~ |N(magnitude_std_mean, magnitude_std_std²)|.
        magnitude_std_std: see magnitude_std_mean (0: every feature's std is magnitude_std_mean).
        orthogonalize_steps: Adam steps that push the directions apart (0: random unit vectors).
        orthogonalize_lr: their learning rate.
        bias_norm: norm of the bias added to every sample (0: none).
        noise_std: standard deviation of Gaussian noise added per dimension (0: none).
        seed: seed of the model (directions, hierarchy, magnitudes, correlation) and of the validation samples.
        file: the model's file; generated and written there when missing, else read (and its config must be
            this one). null: $SAELIGHTNING_CACHE/synthetic/<hash of this config>.safetensors.
    """

    num_features: int = 4096
    d_in: int = 256
    zipf_exponent: float = 0.5
    max_prob: float = 0.4
    min_prob: float = 5e-4
    hierarchy_roots: int = 0
    hierarchy_branching: int = 4
    hierarchy_depth: int = 3
    mutually_exclusive: float = 1.0
    compensate_probabilities: bool = True
    scale_children_by_parent: bool = True
    correlation_rank: int = 0
    correlation_scale: float = 0.1
    magnitude_mean_start: float = 5.0
    magnitude_mean_end: float = 4.0
    magnitude_std_mean: float = 0.5
    magnitude_std_std: float = 0.5
    orthogonalize_steps: int = 100
    orthogonalize_lr: float = 3e-4
    bias_norm: float = 0.5
    noise_std: float = 0.0
    seed: int = 42
    file: str | None = None

    def model_dict(self) -> dict:
        """The fields that define the model (all but where it is stored)."""
        d = asdict(self)
        d.pop("file")
        return d

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def path(self) -> Path:
        if self.file is not None:
            return Path(self.file).expanduser().absolute()
        root = os.environ.get("SAELIGHTNING_CACHE")
        base = Path(root).expanduser() if root else Path.home() / ".cache" / "saelightning"
        return (base / "synthetic" / f"{self.fingerprint()}.safetensors").absolute()


def _bad(name: str, value, rule: str) -> None:
    raise SAELightningError(f"data.synthetic.{name}={value!r} {rule}; fix it in the config")


def hierarchy_size(roots: int, branching: int, depth: int) -> int:
    """Features a full hierarchy uses: roots x (1 + b + ... + b^depth)."""
    return roots * sum(branching ** level for level in range(depth + 1))


def check_config(cfg: SyntheticConfig) -> SyntheticConfig:
    """Refuse a synthetic model that cannot be built, in one line naming the field and the fix (checked where a
    model is built or read, not on construction: a parser that constructs configs would bury the line)."""
    for name in ("num_features", "d_in", "hierarchy_roots", "hierarchy_branching", "hierarchy_depth",
                 "correlation_rank", "orthogonalize_steps", "seed"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int):
            _bad(name, value, "must be an integer")
    for name in ("zipf_exponent", "max_prob", "min_prob", "mutually_exclusive", "correlation_scale",
                 "magnitude_mean_start", "magnitude_mean_end", "magnitude_std_mean", "magnitude_std_std",
                 "orthogonalize_lr", "bias_norm", "noise_std"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _bad(name, value, "must be a finite number")
    if cfg.num_features < 1 or cfg.d_in < 1:
        _bad("num_features" if cfg.num_features < 1 else "d_in", min(cfg.num_features, cfg.d_in), "must be >= 1")
    if cfg.zipf_exponent <= 0:
        _bad("zipf_exponent", cfg.zipf_exponent, "must be > 0")
    if not 0 < cfg.min_prob <= cfg.max_prob <= 1:
        raise SAELightningError(f"data.synthetic needs 0 < min_prob <= max_prob <= 1, got min_prob={cfg.min_prob}, "
                                f"max_prob={cfg.max_prob}; fix them in the config")
    if cfg.hierarchy_roots < 0:
        _bad("hierarchy_roots", cfg.hierarchy_roots, "must be >= 0 (0: no hierarchy)")
    if cfg.hierarchy_roots:
        if cfg.hierarchy_branching < 2:
            _bad("hierarchy_branching", cfg.hierarchy_branching, "must be >= 2")
        if cfg.hierarchy_depth < 1:
            _bad("hierarchy_depth", cfg.hierarchy_depth, "must be >= 1")
        need = hierarchy_size(cfg.hierarchy_roots, cfg.hierarchy_branching, cfg.hierarchy_depth)
        if need > cfg.num_features:
            raise SAELightningError(
                f"data.synthetic: a hierarchy of {cfg.hierarchy_roots} roots x branching {cfg.hierarchy_branching} "
                f"to depth {cfg.hierarchy_depth} needs {need} features and num_features is {cfg.num_features}; "
                "raise num_features or shrink the hierarchy")
    if not 0 <= cfg.mutually_exclusive <= 1:
        _bad("mutually_exclusive", cfg.mutually_exclusive, "must be in [0, 1]")
    if cfg.correlation_rank < 0:
        _bad("correlation_rank", cfg.correlation_rank, "must be >= 0 (0: independent firing)")
    for name in ("correlation_scale", "magnitude_std_mean", "magnitude_std_std", "bias_norm", "noise_std"):
        if getattr(cfg, name) < 0:
            _bad(name, getattr(cfg, name), "must be >= 0")
    for name in ("magnitude_mean_start", "magnitude_mean_end", "orthogonalize_lr"):
        if getattr(cfg, name) <= 0:
            _bad(name, getattr(cfg, name), "must be > 0")
    if cfg.orthogonalize_steps < 0:
        _bad("orthogonalize_steps", cfg.orthogonalize_steps, "must be >= 0")
    return cfg


def seed_of(*parts: int) -> int:
    value = 0
    for p in parts:
        value = (value * 1_000_003 + int(p)) % (2**63)
    return value


# --- building a model ---

def zipf_probabilities(n: int, exponent: float, max_prob: float, min_prob: float) -> torch.Tensor:
    """Firing probability of feature i (rank i + 1), scaled to [min_prob, max_prob] (SAELens's definition)."""
    if n == 1:
        return torch.tensor([max_prob], dtype=torch.float64)
    raw = torch.arange(1, n + 1, dtype=torch.float64).pow(-exponent)
    return min_prob + (max_prob - min_prob) * (raw - raw[-1]) / (raw[0] - raw[-1])


def build_hierarchy(cfg: SyntheticConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(parent [N] (-1: none), depth [N] (-1: not in the hierarchy), exclusive [N] bool: its children are mutually
    exclusive). Features are numbered breadth first: the roots 0..R-1, then each level in order."""
    n = cfg.num_features
    parent = torch.full((n,), -1, dtype=torch.long)
    depth = torch.full((n,), -1, dtype=torch.long)
    exclusive = torch.zeros(n, dtype=torch.bool)
    if not cfg.hierarchy_roots:
        return parent, depth, exclusive
    level = list(range(cfg.hierarchy_roots))
    depth[level] = 0
    nxt, parents = cfg.hierarchy_roots, []
    for d in range(1, cfg.hierarchy_depth + 1):
        children = []
        for p in level:
            kids = list(range(nxt, nxt + cfg.hierarchy_branching))
            nxt += cfg.hierarchy_branching
            parent[kids], depth[kids] = p, d
            children += kids
            parents.append(p)
        level = children
    chosen = random.Random(seed_of(cfg.seed, 3)).sample(parents, int(len(parents) * cfg.mutually_exclusive))
    exclusive[chosen] = True
    return parent, depth, exclusive


def compensate(base: torch.Tensor, parent: torch.Tensor, exclusive: torch.Tensor) -> torch.Tensor:
    """Probabilities raised so that gating by the parent (and mutual exclusion) keeps each child near its base rate:
    p_child / p_parent, times 1 + Σ p_siblings / p_parent when the parent's children are exclusive; at most 1."""
    out = base.clone()
    child = parent >= 0
    if not child.any():
        return out
    idx, par = child.nonzero().flatten(), parent[child]
    factor = 1.0 / base[par]
    sibling_sum = torch.zeros_like(base).index_add_(0, par, base[idx])  # Σ p of each parent's children
    me = exclusive[par]
    factor = torch.where(me, factor * (1 + (sibling_sum[par] - base[idx]).clamp_min(0) / base[par]), factor)
    out[idx] = (base[idx] * factor).clamp(max=1.0)
    return out


def low_rank_factor(n: int, rank: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    """F [n, rank] ~ scale · N(0, 1), rows rescaled to ||F_i||² = 0.99 where they would leave under 0.01 of the
    variance to the feature itself (SAELens's cap)."""
    factor = torch.randn(n, rank, generator=generator, dtype=torch.float64) * scale
    sq = factor.pow(2).sum(1, keepdim=True)
    return torch.where(sq > 0.99, factor * (0.99 / sq).sqrt(), factor)


def orthogonalize(features: torch.Tensor, steps: int, lr: float, chunk: int = 1024) -> torch.Tensor:
    """Adam on Σ_{i≠j} <f_i, f_j>² with rows projected back to unit norm after each step (gradient 4 (G - diag G) F,
    G = F Fᵀ, in chunks of rows so memory stays chunk x N)."""
    f = torch.nn.Parameter(features.clone())
    optimizer = torch.optim.Adam([f], lr=lr)
    n = f.shape[0]
    for _ in range(steps):
        with torch.no_grad():
            grad = torch.empty_like(f)
            for a in range(0, n, chunk):
                gram = f[a:a + chunk] @ f.T
                rows = torch.arange(gram.shape[0], device=f.device)
                gram[rows, rows + a] = 0
                grad[a:a + chunk] = 4 * gram @ f
        f.grad = grad
        optimizer.step()
        with torch.no_grad():
            f.div_(f.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return f.detach()


def cosine_stats(features: torch.Tensor, chunk: int = 1024) -> dict[str, float]:
    """Mean and max |cos| between distinct features (the superposition's interference)."""
    n = features.shape[0]
    if n < 2:
        return {"mean_abs_cos": 0.0, "max_abs_cos": 0.0}
    total, top = 0.0, 0.0
    for a in range(0, n, chunk):
        gram = (features[a:a + chunk] @ features.T).abs()
        rows = torch.arange(gram.shape[0], device=features.device)
        gram[rows, rows + a] = 0
        total += float(gram.double().sum())
        top = max(top, float(gram.max()))
    return {"mean_abs_cos": total / (n * (n - 1)), "max_abs_cos": top}


def hierarchy_levels(parent: torch.Tensor, depth: torch.Tensor, exclusive: torch.Tensor, device) -> list[tuple]:
    """Per depth 1, 2, ...: ((first, end) of the parents, (first, end) of their children, which of the parents have
    mutually exclusive children [parents] bool, or None when none has). build_hierarchy numbers breadth first
    with a fixed branching, so both are index ranges and parent j's children are the j-th run of `branching`; a
    file that is not laid out so is refused."""
    levels = []
    for d in range(1, int(depth.max()) + 1 if depth.numel() else 1):  # depth is -1 everywhere without a hierarchy
        children = (depth == d).nonzero().flatten()
        parents = (depth == d - 1).nonzero().flatten()
        p0, p1, c0, c1 = int(parents[0]), int(parents[-1]) + 1, int(children[0]), int(children[-1]) + 1
        b = len(children) // max(1, len(parents))
        layout = torch.arange(p0, p1).repeat_interleave(b)
        if c1 - c0 != len(children) or p1 - p0 != len(parents) or not torch.equal(parent[children], layout):
            raise SAELightningError("the synthetic model's hierarchy is not laid out breadth first with a fixed "
                                    "branching; regenerate the model file")
        mine = exclusive[p0:p1]
        levels.append(((p0, p1), (c0, c1), mine.to(device) if mine.any() else None))
    return levels


def build_model(cfg: SyntheticConfig, device=None) -> "SyntheticModel":
    """The model of cfg: every random choice from cfg.seed on the CPU; the orthogonalization runs on `device`."""
    check_config(cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    n, d = cfg.num_features, cfg.d_in
    features = torch.randn(n, d, generator=g)
    features = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    bias = torch.randn(d, generator=g)
    bias = bias / bias.norm().clamp_min(1e-12) * cfg.bias_norm
    std = (cfg.magnitude_std_mean + cfg.magnitude_std_std * torch.randn(n, generator=g, dtype=torch.float64)).abs()
    factor = low_rank_factor(n, cfg.correlation_rank, cfg.correlation_scale, g) if cfg.correlation_rank else None
    parent, depth, exclusive = build_hierarchy(cfg)
    base = zipf_probabilities(n, cfg.zipf_exponent, cfg.max_prob, cfg.min_prob)
    probs = compensate(base, parent, exclusive) if cfg.compensate_probabilities else base
    mean = torch.linspace(cfg.magnitude_mean_start, cfg.magnitude_mean_end, n, dtype=torch.float64) if n > 1 else \
        torch.tensor([cfg.magnitude_mean_start], dtype=torch.float64)
    if cfg.orthogonalize_steps:
        features = orthogonalize(features.to(device or "cpu"), cfg.orthogonalize_steps, cfg.orthogonalize_lr).cpu()
    tensors = {"features": features, "bias": bias, "probabilities": probs.float(), "magnitude_mean": mean.float(),
               "magnitude_std": std.float(), "parent": parent, "depth": depth, "exclusive": exclusive.to(torch.uint8)}
    if factor is not None:
        tensors["correlation_factor"] = factor.float()
    return SyntheticModel(cfg, tensors, stats=cosine_stats(features.to(device or "cpu")))


# --- the model ---

class SyntheticModel:
    """Samples (x, true feature activations) from a built or loaded model; every draw from a given generator."""

    def __init__(self, cfg: SyntheticConfig, tensors: dict[str, torch.Tensor], stats: dict | None = None,
                 path: Path | None = None):
        self.cfg, self.tensors, self.stats, self.path = cfg, tensors, dict(stats or {}), path
        self.device = torch.device("cpu")
        self._prepare()

    def _prepare(self) -> None:
        t = self.tensors
        self.features, self.bias = t["features"], t["bias"]
        self.probabilities, self.mean, self.std = t["probabilities"], t["magnitude_mean"], t["magnitude_std"]
        self.factor = t.get("correlation_factor")
        if self.factor is not None:  # the copula's thresholds and each feature's own share of the variance
            self.own_std = (1 - self.factor.pow(2).sum(1)).clamp_min(0).sqrt()
            self.thresholds = math.sqrt(2) * torch.erfinv(1 - 2 * self.probabilities.double()).float()
        self.levels = hierarchy_levels(t["parent"].cpu(), t["depth"].cpu(), t["exclusive"].cpu().bool(), self.device)

    @property
    def num_features(self) -> int:
        return self.features.shape[0]

    @property
    def d_in(self) -> int:
        return self.features.shape[1]

    def to(self, device) -> "SyntheticModel":
        self.device = torch.device(device)
        self.tensors = {k: v.to(self.device) for k, v in self.tensors.items()}
        self._prepare()
        return self

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [n, d_in], true activations [n, N]), fp32 on the model's device."""
        shape = (n, self.num_features)
        if self.factor is not None:
            eps = torch.randn(n, self.factor.shape[1], generator=generator, device=self.device)
            z = eps @ self.factor.T + torch.randn(shape, generator=generator, device=self.device) * self.own_std
            fired = z > self.thresholds
        else:
            fired = torch.rand(shape, generator=generator, device=self.device) < self.probabilities
        flat = fired.view(-1).nonzero().squeeze(1)  # the fired (sample, feature) pairs, row-major
        cols = flat % self.num_features
        noise = torch.empty(flat.shape[0], device=self.device).normal_(generator=generator)
        acts = torch.zeros(n * self.num_features, device=self.device)
        acts[flat] = (self.mean[cols] + self.std[cols] * noise).relu()
        acts = acts.view(shape)
        for level in self.levels:
            self._gate(acts, level, generator)
        if self.device.type == "cpu":  # the few active features' rows (index_add_ is deterministic on the CPU)
            rows, cols = acts.nonzero(as_tuple=True)
            x = self.bias.expand(n, -1).clone().index_add_(0, rows, acts[rows, cols, None] * self.features[cols])
        else:  # one dense product (a sparse scatter would add atomically, in no fixed order)
            x = acts @ self.features + self.bias
        if self.cfg.noise_std:
            x = x + self.cfg.noise_std * torch.randn(x.shape, generator=generator, device=self.device)
        return x, acts

    def _gate(self, acts: torch.Tensor, level: tuple, generator: torch.Generator) -> None:
        """One level of the hierarchy, in place: children follow their parent (gated, or scaled by parent value /
        parent mean), then in each mutually exclusive sibling group one active child (uniformly) stays."""
        (p0, p1), (c0, c1), exclusive = level
        children = acts[:, c0:c1].view(acts.shape[0], p1 - p0, -1)  # [n, parents, branching], a view of acts
        parents = acts[:, p0:p1]
        gate = parents / self.mean[p0:p1] if self.cfg.scale_children_by_parent else (parents > 0).to(acts.dtype)
        children.mul_(gate.unsqueeze(-1))
        if exclusive is None:
            return
        active = children > 0  # [n, parents, b]
        rows, owner = ((active.sum(-1) > 1) & exclusive).nonzero(as_tuple=True)  # two or more siblings fired
        if rows.numel() == 0:
            return
        clash = active[rows, owner]
        scores = torch.rand(clash.shape, generator=generator, device=acts.device).masked_fill(~clash, -1.0)
        keep = torch.zeros_like(clash).scatter_(1, scores.argmax(1, keepdim=True), True)
        children[rows, owner] = children[rows, owner] * keep

    def generator(self, *parts: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed_of(*parts))

    def block(self, stream: int, seed: int, index: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `index` (n samples) of a seed stream: TRAIN (seed = data.seed), VAL or SCALE (seed = the model's)."""
        return self.sample(n, self.generator(stream, seed, index))

    def val_block(self, index: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.block(VAL, self.cfg.seed, index, n)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.tensors):
            h.update(name.encode())
            h.update(self.tensors[name].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(self.cfg.model_dict()),
                    "stats": json.dumps(self.stats)}
        with atomic_path(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}, str(tmp),
                      metadata=metadata)
        self.path = path
        return path


def read_model(path) -> SyntheticModel:
    """A synthetic model file as save() wrote it (its config from the metadata)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SAELightningError(f"no synthetic model file at {path}; give data.synthetic (its config) to generate one")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error type for every kind of damage
        raise SAELightningError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0]}); delete it "
                                "and run again to regenerate it") from None
    if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
        raise SAELightningError(f"{path} is not a saelightning synthetic model (version {VERSION}); point "
                                "data.synthetic.file elsewhere or delete it")
    known = {f.name for f in fields(SyntheticConfig)}
    cfg = check_config(SyntheticConfig(**{k: v for k, v in json.loads(meta["config"]).items() if k in known},
                                       file=str(path)))
    return SyntheticModel(cfg, tensors, stats=json.loads(meta.get("stats", "{}")), path=path.absolute())


def check_same(cfg: SyntheticConfig, model: SyntheticModel) -> None:
    """The file at cfg.path() holds cfg's model (else it is another model: one line naming the first difference)."""
    mine, theirs = cfg.model_dict(), model.cfg.model_dict()
    for key in mine:
        if mine[key] != theirs.get(key):
            raise SAELightningError(
                f"{model.path} holds a synthetic model with {key}={theirs.get(key)!r}, the config says {mine[key]!r}; "
                "point data.synthetic.file at another path (or null) or delete the file")


def load_or_build(cfg: SyntheticConfig, device=None, write: bool = True) -> SyntheticModel:
    """cfg's model: read from cfg.path() when it is there (and checked to be cfg's), else built (and written there
    when `write`)."""
    path = check_config(cfg).path()
    if path.is_file():
        model = read_model(path)
        check_same(cfg, model)
        return model
    model = build_model(cfg, device)
    if write:
        model.save(path)
    return model


# --- streams: training blocks (the data module's reader) and the held-out validation samples ---

class SyntheticBlocks(IterableDataset):
    """Training blocks for one reader, in TokenReader's item layout {"tokens", "worker", "state"}.

    Reader slot = rank x num_workers + worker of world = world_size x num_workers takes blocks slot, slot + world,
    ... of the TRAIN stream (disjoint across ranks and workers); its state is the count it has handed out. With a
    (CPU) model the block is generated here, in the DataLoader worker; without, the block's index is handed out
    and the trainer generates it on its device."""

    def __init__(self, model: SyntheticModel | None, block: int, seed: int, rank: int = 0, world_size: int = 1,
                 start: dict | None = None):
        self.model, self.block, self.seed, self.rank, self.world_size = model, block, seed, rank, world_size
        self.start = {int(k): dict(v) for k, v in ((start or {}).get("workers") or {}).items()}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        slot, world = self.rank * n_workers + worker, self.world_size * n_workers
        i = self.start.get(worker, {}).get("next", 0)
        while True:
            index = slot + world * i
            i += 1
            payload = torch.tensor(index) if self.model is None else \
                self.model.block(TRAIN, self.seed, index, self.block)[0]
            yield {"tokens": payload, "worker": worker, "state": {"next": i}}


class SyntheticVal:
    """The held-out samples as validation batches {"acts": {HOOK: x}, "truth": true activations}: blocks of `block`
    samples of the model's VAL stream, `tokens` in all; rank r of `world` takes blocks r, r + world, ..."""

    def __init__(self, model: SyntheticModel, block: int, tokens: int, rank: int = 0, world: int = 1):
        self.model, self.block, self.tokens = model, block, tokens
        self.indices = list(range(math.ceil(tokens / block)))[rank::world]

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        for i in self.indices:
            x, truth = self.model.val_block(i, min(self.block, self.tokens - i * self.block))
            yield {"acts": {HOOK: x}, "truth": truth}
