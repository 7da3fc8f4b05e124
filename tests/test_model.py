"""The nanochat GPT: parity with nanochat's own numbers, hook points, stop_at_layer, KV cache, generate."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from saelightning.errors import SAELightningError
from saelightning.hooks import HOOK_KINDS, hook_names
from saelightning.nanochat.model import GPT, GPTConfig, KVCache, window_sizes
from tests.fixtures_nanochat import (
    REFERENCE_CONFIGS,
    REFERENCE_POSITIONS,
    formula_state_dict,
    make_nanochat_model,
    reference_tokens,
)

pytestmark = pytest.mark.numerics  # fp32 results compared across code paths: also run under other CPU kernels

REFERENCE = Path(__file__).parent / "data" / "nanochat_reference.pt"
ERAS = ("original", "current")


def block_outputs(model, idx, **kw):
    """Residual stream after every block, read with forward hooks on transformer.h[i] (as nanochat's)."""
    outs = []
    handles = [b.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone())) for b in model.transformer.h]
    with torch.no_grad():
        logits = model(idx, **kw)
    for h in handles:
        h.remove()
    return logits, outs


def tokens(vocab, T, B=2, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("era", ERAS)
def test_matches_logits_and_residuals_computed_by_nanochat(era):
    # tests/data/nanochat_reference.pt holds karpathy/nanochat's own outputs (3a5e0bc / 92d63d4, CPU fp32)
    ref = torch.load(REFERENCE, weights_only=True)
    model = GPT(GPTConfig(**REFERENCE_CONFIGS[era], era=era))
    model.load_state_dict(formula_state_dict(model))
    model.eval().requires_grad_(False)
    logits, outs = block_outputs(model, reference_tokens(era))
    pos = REFERENCE_POSITIONS[era]
    torch.testing.assert_close(logits[0, pos], ref[f"{era}.logits"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack([o[0, pos] for o in outs]), ref[f"{era}.resid_post"], atol=5e-5, rtol=1e-5)


def test_window_sizes_follow_nanochat_head_rule():
    cfg = GPTConfig(sequence_len=2048, n_layer=6, window_pattern="SSSL")
    assert window_sizes(cfg) == [512, 512, 512, 2048, 512, 2048]  # last layer always long
    assert window_sizes(GPTConfig(sequence_len=3000, n_layer=2, window_pattern="SL")) == [768, 3000]
    assert window_sizes(GPTConfig(n_layer=3, era="original")) == [-1, -1, -1]
    with pytest.raises(SAELightningError, match="sliding windows"):
        GPTConfig(era="original", window_pattern="SL")


@pytest.mark.parametrize("era", ERAS)
def test_capture_hooks_change_nothing_and_see_consistent_activations(era):
    model = make_nanochat_model(era, n_layer=3)
    idx = tokens(512, 20)
    seen = {}
    hooks = {name: (lambda x, name=name: seen.__setitem__(name, x.clone())) for name in hook_names(3)}
    with torch.no_grad():
        plain = model(idx)
        hooked = model(idx, hooks=hooks)
    assert torch.equal(plain, hooked)
    assert set(seen) == set(hook_names(3))
    for i in range(3):
        b = f"blocks.{i}."
        assert seen[b + "mlp.hook_post"].shape == (2, 20, 4 * 64)
        assert (seen[b + "mlp.hook_post"] >= 0).all()  # relu^2
        torch.testing.assert_close(seen[b + "hook_resid_mid"], seen[b + "hook_resid_pre"] + seen[b + "hook_attn_out"])
        torch.testing.assert_close(seen[b + "hook_resid_post"], seen[b + "hook_resid_mid"] + seen[b + "hook_mlp_out"])
        mlp = model.transformer.h[i].mlp
        torch.testing.assert_close(seen[b + "hook_mlp_out"], mlp.c_proj(seen[b + "mlp.hook_post"]))
        # hook_mlp_in is what the MLP reads: the RMS-normed resid_mid, and the MLP of it is hook_mlp_out exactly
        assert torch.equal(seen[b + "hook_mlp_in"], F.rms_norm(seen[b + "hook_resid_mid"], (64,)))
        with torch.no_grad():
            assert torch.equal(mlp(seen[b + "hook_mlp_in"]), seen[b + "hook_mlp_out"])
    # resid_post of block i is resid_pre of block i+1 only without the current era's lambda mix
    same = torch.equal(seen["blocks.0.hook_resid_post"], seen["blocks.1.hook_resid_pre"])
    assert same == (era == "original")


@pytest.mark.parametrize("era", ERAS)
def test_replacing_hooks_change_downstream_only(era):
    model = make_nanochat_model(era, n_layer=3)
    idx = tokens(512, 16)
    delta = torch.randn(64)
    seen = {}
    hooks = {
        "blocks.1.hook_resid_mid": lambda x: x + delta,
        "blocks.0.hook_resid_post": lambda x: seen.__setitem__("post0", x.clone()),
        "blocks.1.hook_mlp_out": lambda x: seen.__setitem__("mlp1", x.clone()),
    }
    base = model.run_with_cache(idx, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"])
    with torch.no_grad():
        logits = model(idx, hooks=hooks)
        plain = model(idx)
    assert torch.equal(seen["post0"], base["blocks.0.hook_resid_post"])  # upstream untouched
    assert not torch.allclose(seen["mlp1"], base["blocks.1.hook_mlp_out"])  # the MLP saw the edit
    assert (logits - plain).abs().max() > 1e-3
    # zero-ablating the MLP hidden layer equals removing the MLP's contribution
    zero = {"blocks.2.mlp.hook_post": lambda x: torch.zeros_like(x)}
    got = model.run_with_cache(idx, ["blocks.2.hook_resid_post", "blocks.2.hook_resid_mid"], hooks=zero)
    torch.testing.assert_close(got["blocks.2.hook_resid_post"], got["blocks.2.hook_resid_mid"])


def test_replacing_hook_mlp_in_is_what_the_mlp_reads():
    """A replaced MLP input feeds the MLP (and only it): hook_mlp_out is then the MLP of the replacement."""
    model = make_nanochat_model("current", n_layer=2)
    idx = tokens(512, 12)
    swap = torch.randn(2, 12, 64)
    got = model.run_with_cache(idx, ["blocks.1.hook_mlp_out", "blocks.1.hook_resid_mid"],
                               hooks={"blocks.1.hook_mlp_in": lambda x: swap})
    with torch.no_grad():
        assert torch.equal(got["blocks.1.hook_mlp_out"], model.transformer.h[1].mlp(swap))
    clean = model.run_with_cache(idx, ["blocks.1.hook_resid_mid"])
    assert torch.equal(got["blocks.1.hook_resid_mid"], clean["blocks.1.hook_resid_mid"])  # upstream untouched


def test_hook_returning_wrong_shape_and_unknown_names_are_one_line_errors():
    model = make_nanochat_model("current")
    idx = tokens(512, 8)
    with pytest.raises(SAELightningError, match="return None or a tensor of shape") as e:
        model(idx, hooks={"blocks.0.hook_resid_pre": lambda x: x[:, :1]})
    assert "\n" not in str(e.value)
    with pytest.raises(SAELightningError, match=r"valid names are blocks\.\{0\.\.1\}") as e:
        model(idx, hooks={"blocks.0.resid": lambda x: None})
    assert "\n" not in str(e.value) and all(k in str(e.value) for k in HOOK_KINDS)
    with pytest.raises(SAELightningError, match="out of range"):
        model.run_with_cache(idx, ["blocks.2.hook_resid_post"])
    with pytest.raises(SAELightningError, match="stop_at_layer 5 is out of range"):
        model(idx, stop_at_layer=5)


@pytest.mark.parametrize("era", ERAS)
def test_stop_at_layer_runs_only_the_needed_blocks(era):
    model = make_nanochat_model(era, n_layer=4)
    calls = []
    for i, b in enumerate(model.transformer.h):
        b.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    idx = tokens(512, 12)
    with torch.no_grad():
        assert model(idx, stop_at_layer=1) is None
        assert calls == [0, 1]
        calls.clear()
        full = {}
        model(idx, hooks={"blocks.1.hook_resid_post": lambda x: full.__setitem__("a", x.clone()),
                          "blocks.0.mlp.hook_post": lambda x: full.__setitem__("b", x.clone())})
        assert calls == [0, 1, 2, 3]
        calls.clear()
        got = model.run_with_cache(idx, ["blocks.1.hook_resid_post", "blocks.0.mlp.hook_post"])
    assert calls == [0, 1]
    assert (torch.equal(got["blocks.1.hook_resid_post"], full["a"])
            and torch.equal(got["blocks.0.mlp.hook_post"], full["b"]))


@pytest.mark.parametrize("era,T", [("original", 40), ("current", 150)])
def test_kv_cache_decoding_matches_full_forward(era, T):
    # current era at T=150 > 129: block 0's 128-token sliding window is in force
    model = make_nanochat_model(era, n_layer=3)
    assert era == "original" or model.window_sizes[0] == 128
    idx = tokens(512, T)
    cache = KVCache(model.n_layer)
    with torch.no_grad():
        full = model(idx)
        steps = [model(idx[:, : T - 25], kv_cache=cache)]  # prefill, then 25 single-token steps
        steps += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(T - 25, T)]
    assert cache.pos == T
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    if era == "current":  # and the window matters: full attention gives other logits
        model.window_sizes = [-1] * 3
        with torch.no_grad():
            assert (model(idx)[:, -1] - full[:, -1]).abs().max() > 1e-4


@pytest.mark.parametrize("era", ERAS)
def test_greedy_generate_equals_repeated_full_forward_argmax(era):
    model = make_nanochat_model(era)
    prompts = [[1, 5, 9, 200], [7, 3], [11, 12, 13, 14]]  # two lengths: two prefill groups
    out = list(model.generate(prompts, max_tokens=6, temperature=0.0))
    assert len(out) == 6 and all(len(step) == 3 for step in out)
    for j, prompt in enumerate(prompts):
        ids = list(prompt)
        for step in out:
            with torch.no_grad():
                expected = model(torch.tensor([ids]))[0, -1].argmax().item()
            assert step[j] == expected
            ids.append(expected)
    single = [s[0] for s in model.generate(prompts[0], max_tokens=6, temperature=0.0)]
    assert single == [s[0] for s in out]


def test_sampling_is_seeded_and_top_k_restricts():
    model = make_nanochat_model("current")
    a = [s[0] for s in model.generate([1, 2, 3], 12, temperature=1.0, seed=3)]
    b = [s[0] for s in model.generate([1, 2, 3], 12, temperature=1.0, seed=3)]
    assert a == b
    top1 = [s[0] for s in model.generate([1, 2, 3], 5, temperature=1.0, top_k=1, seed=9)]
    assert top1 == [s[0] for s in model.generate([1, 2, 3], 5, temperature=0.0)]


def test_generate_applies_hooks_at_prefill_and_each_step():
    model = make_nanochat_model("current")
    shapes = []

    def steer(x):
        shapes.append(x.shape[1])
        return x + 50.0 * model.lm_head.weight[42]  # push the last block toward token 42

    out = [s[0] for s in model.generate([4, 5, 6, 7], 4, temperature=0.0, hooks={"blocks.1.hook_resid_post": steer})]
    assert shapes == [4, 1, 1, 1]  # prefill once, then one token per step
    assert out == [42, 42, 42, 42]


def test_trains_with_autograd():
    # 4 layers: backout subtracts block 2's output and block 3 follows; with 2 layers the subtracted block is
    # the last one, norm() cancels the (1 - backout_lambda) scale and its gradient is 0 up to rounding
    model = make_nanochat_model("current", n_layer=4)
    next(model.generate([1, 2], 1))  # rotary tables first built under inference_mode must not break training
    model.train()
    idx = tokens(512, 17, B=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 512), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 1e-6}
    assert {"smear_lambda", "backout_lambda", "resid_lambdas", "transformer.h.1.attn.ve_gate.weight"} <= grads
    assert losses[-1] < losses[0] - 0.3


def test_original_era_keeps_wte_bf16_and_pads_no_vocab():
    model = GPT(GPTConfig(vocab_size=100, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, era="original"))
    assert model.transformer.wte.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.float32
    assert model.lm_head.weight.shape[0] == 100
    cur = GPT(GPTConfig(vocab_size=100, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    assert cur.lm_head.weight.shape[0] == 128 and cur(torch.tensor([[1, 2]])).shape == (1, 2, 100)
