"""Fixtures: tiny nanochat checkpoints of both eras, written in nanochat's own format.

A base dir looks like nanochat's: base_checkpoints/d2/model_000010.pt (torch.save of a state_dict)
+ meta_000010.json (model_config = GPTConfig kwargs), and tokenizer/ (the tiny rustbpe tokenizer).
Weights are random but not nanochat's init (which zeroes c_proj and lm_head, so logits would be 0).
"""

import math
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from saelightning.nanochat.checkpoint import save_nanochat_checkpoint
from saelightning.nanochat.model import GPT, GPTConfig
from saelightning.nanochat.tokenizer import load_tokenizer

FIXTURE_STEP = 10
FIXTURE_TAG = "d2"
# the session models: 2 layers, width 64, GQA (4 query heads, 2 kv heads)
FIXTURE_CONFIG = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
# current era: sequence_len 256 gives a short window of 128, so sequences over 129 tokens are windowed
FIXTURE_SEQUENCE_LEN = {"current": 256, "original": 128}


def randomize_(model: GPT, seed: int = 0) -> GPT:
    """Seeded random weights of a realistic scale in every parameter (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda"):
                new = torch.rand(p.shape, generator=g) * 0.6 + 0.3
            elif "wte" in name or "value_embeds" in name:
                new = torch.randn(p.shape, generator=g)
            else:  # linears: std 1.5/sqrt(fan_in), enough for attention patterns to be non-uniform
                new = torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(p.shape[-1]))
            p.copy_(new.to(p.dtype))
    return model


def make_nanochat_model(era: str, seed: int = 0, **config) -> GPT:
    """A random GPT of the era; config overrides GPTConfig fields (vocab_size, n_layer, ...)."""
    kwargs = {"sequence_len": FIXTURE_SEQUENCE_LEN[era], "vocab_size": 512, **FIXTURE_CONFIG, **config}
    return randomize_(GPT(GPTConfig(**kwargs, era=era)), seed).eval()


def make_nanochat_checkpoint(directory, era: str, step: int = FIXTURE_STEP, seed: int = 0,
                             key_prefix: str = "", weights_dtype: torch.dtype | None = None, **config) -> Path:
    """Write a random model of the era as nanochat does: <directory>/model_{step:06d}.pt + meta json.

    key_prefix="_orig_mod." mimics a torch.compile'd model; weights_dtype=torch.bfloat16 mimics a
    GPU-trained checkpoint. Returns the checkpoint directory.
    """
    model = make_nanochat_model(era, seed, **config)
    sd = {key_prefix + k: (v.to(weights_dtype) if weights_dtype and v.is_floating_point() else v)
          for k, v in model.state_dict().items()}
    save_nanochat_checkpoint(directory, step, sd, asdict(model.config), extra_meta={"val_bpb": 1.5})
    return Path(directory)


def _base_dir(tmp_path_factory, tokenizer_dir, era: str) -> Path:
    base = tmp_path_factory.mktemp(f"nanochat_{era}")
    shutil.copytree(tokenizer_dir, base / "tokenizer")
    vocab = load_tokenizer(base / "tokenizer").vocab_size
    make_nanochat_checkpoint(base / "base_checkpoints" / FIXTURE_TAG, era, vocab_size=vocab)
    return base


@pytest.fixture(scope="session")
def nanochat_current_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A nanochat base dir with a random current-era d2 model (width 64, GQA, seq_len 256) + tokenizer."""
    return _base_dir(tmp_path_factory, tiny_tokenizer_dir, "current")


@pytest.fixture(scope="session")
def nanochat_original_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A nanochat base dir with a random original-era d2 model (width 64, GQA, seq_len 128) + tokenizer."""
    return _base_dir(tmp_path_factory, tiny_tokenizer_dir, "original")


# -- pinned parity with nanochat's own code (tests/data/nanochat_reference.pt was computed by nanochat)
# Weights come from a closed formula (no RNG), so the reference stays valid across torch versions.
REFERENCE_CONFIGS = {
    "original": dict(sequence_len=64, vocab_size=100, n_layer=2, n_head=2, n_kv_head=1, n_embd=32),
    # seq_len 256: layers 0-1 get a 128-token window, so T=160 is windowed; vocab 100 pads to 128
    "current": dict(sequence_len=256, vocab_size=100, n_layer=3, n_head=2, n_kv_head=1, n_embd=32,
                    window_pattern="SSSL"),
}
REFERENCE_T = {"original": 40, "current": 160}
REFERENCE_POSITIONS = {"original": [0, 1, 2, 20, 39], "current": [0, 1, 2, 80, 128, 129, 130, 159]}


def formula_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Deterministic non-trivial weights for every parameter of the model, keyed like nanochat's."""
    sd = {}
    for j, (name, p) in enumerate(sorted(model.state_dict().items())):
        wave = torch.sin(torch.arange(p.numel(), dtype=torch.float64) * (0.7 + 0.013 * j) + j).view(p.shape)
        if name in ("resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda"):
            value = 0.6 + 0.3 * wave
        elif "wte" in name or "value_embeds" in name:
            value = wave * 1.4
        else:
            value = wave * (2.0 / math.sqrt(p.shape[-1]))
        sd[name] = value.to(p.dtype)
    return sd


def reference_tokens(era: str) -> torch.Tensor:
    T, V = REFERENCE_T[era], REFERENCE_CONFIGS[era]["vocab_size"]
    return ((torch.arange(T) * 37 + 11) % V).view(1, T)
