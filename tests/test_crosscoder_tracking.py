"""Exact crosscoder tracking at inference: OneModel with partners runs the crosscoder's other models on the same
tokens (their own KV caches in generation), so InterpretableModel's latents are the crosscoder's own encode of
every model's activation; without partners, model m's block alone. On the bundled demo base and chat models."""

import re

import pytest
import torch

from saelightning.cli import main
from saelightning.errors import SAELightningError
from saelightning.export import load_sae, save_sae
from saelightning.nanochat.checkpoint import load_nanochat
from saelightning.nanochat.model import KVCache
from saelightning.runtime import InterpretableModel, Steer, dense_latents
from saelightning.saes import OneModel, SAEConfig, build_sae

# fp32 results compared across code paths: also run under other CPU kernels; one torch thread (small ops)
pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_thread")]

DEMO = "checkpoints/nanochat-demo"
HOOK = "blocks.2.hook_resid_post"
D_SAE = 64
EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def models():
    base = load_nanochat(DEMO, device="cpu", dtype=torch.float32)
    chat = load_nanochat(DEMO, source="sft", device="cpu", dtype=torch.float32)
    return base, chat


@pytest.fixture(scope="module")
def cc(models):
    """A BatchTopK crosscoder over base and chat with distinct scales and an inference threshold that drops some
    of the positive latents (so the threshold is part of what is compared)."""
    d = models[0].model.d_model
    torch.manual_seed(5)
    cc = build_sae(SAEConfig(architecture="crosscoder", d_in=2 * d, d_sae=D_SAE, n_models=2, k=8)).eval()
    cc.metadata = {"hook_name": HOOK, "models": [{"name": "base"}, {"name": "chat"}]}
    with torch.no_grad():
        cc.b_enc.normal_(0, 0.05)
        cc.input_scale.copy_(torch.tensor([0.5, 0.25]))
        x = _acts(models, torch.tensor([[models[0].tokenizer.bos_id, *range(40, 60)]]))
        pre = (torch.cat(x, -1).reshape(-1, 2 * d) * cc.input_scales() - cc.b_dec) @ cc.W_enc + cc.b_enc
        ranked = pre.relu() * cc.code_norms()
        cc.threshold.fill_(float(ranked[ranked > 0].median()))
    return cc


def _acts(models, idx) -> list[torch.Tensor]:
    """Each model's activation at HOOK for a full-sequence forward [B, T, d]."""
    return [nc.model.run_with_cache(idx, [HOOK])[HOOK] for nc in models]


def _cached_acts(nc, ids: list[int], prompt_len: int) -> torch.Tensor:
    """The activation at HOOK as generation sees it: a prefill of the prompt, then one token per forward with
    the KV cache [1, T, d]."""
    cache, grabbed = KVCache(nc.model.n_layer), []
    feeds = [ids[:prompt_len]] + [[t] for t in ids[prompt_len:]]
    for feed in feeds:
        nc.model(torch.tensor([feed]), hooks={HOOK: grabbed.append}, kv_cache=cache)
    return torch.cat(grabbed, 1)


def _encode(cc, x: list[torch.Tensor]) -> torch.Tensor:
    """The crosscoder's own latents of the models' raw activations [N, d_sae]."""
    full = torch.cat(x, -1).reshape(-1, cc.config.d_in)
    return cc.encode(full * cc.input_scales())


def _rounding(cc, x: list[torch.Tensor]) -> torch.Tensor:
    """fp32 bound on one latent's change under another reduction order: γ_n (Σ|x_i w_i| + |b|), n = M·d terms."""
    full = torch.cat(x, -1).reshape(-1, cc.config.d_in) * cc.input_scales()
    n = cc.config.d_in
    return n * EPS * ((full.abs() + cc.b_dec.abs()) @ cc.W_enc.abs() + cc.b_enc.abs())


def _assert_close_away_from_threshold(cc, x, got, want, tol):
    """got == want within tol, with no positive pre-activation's f_i c_i within tol c_i of θ (where rounding
    could flip the latent on or off); x: the models' activations the reference want was encoded from."""
    full = torch.cat(x, -1).reshape(-1, cc.config.d_in) * cc.input_scales()
    pre = torch.addmm(cc.b_enc, full - cc.b_dec if cc.config.apply_b_dec_to_input else full, cc.W_enc)
    c = cc.code_norms().expand_as(pre)
    positive = pre > 0
    assert bool(((pre * c - cc.threshold).abs()[positive] > (tol * c)[positive]).all())
    assert torch.equal(got != 0, want != 0)
    assert bool(((got - want).abs() <= tol).all()), float((got - want).abs().max())


@pytest.mark.parametrize("tracked", ["base", "chat"])
def test_tracking_with_partners_is_the_crosscoders_encode_at_every_position(models, cc, tracked):
    m = ["base", "chat"].index(tracked)
    nc, partner = models[m], models[1 - m]
    im = InterpretableModel(nc, {HOOK: OneModel(cc, tracked, partners=[partner])})
    assert im.saes[HOOK].exact and im.saes[HOOK].metadata["crosscoder_tracking"] == "exact"
    idx = torch.tensor([nc.tokenizer.encode("def sorted(iterable): return a new list")])
    x = _acts(models, idx)
    want = _encode(cc, x)
    with im.track(top_n=None) as trace:
        im(idx)
    got = dense_latents(*trace.latents(HOOK), D_SAE).reshape(want.shape)
    _assert_close_away_from_threshold(cc, x, got, want, _rounding(cc, x))
    assert int((want > 0).sum()) > 0 and int((got == 0).sum()) > 0
    # without partners: today's value, this model's block alone (the other block reads zero)
    alone = InterpretableModel(nc, {HOOK: OneModel(cc, tracked)})
    assert not alone.saes[HOOK].exact
    with alone.track(top_n=None) as trace:
        alone(idx)
    blocks = [torch.zeros_like(x[0]), torch.zeros_like(x[0])]
    blocks[m] = x[m]
    want_alone = _encode(cc, blocks)
    got_alone = dense_latents(*trace.latents(HOOK), D_SAE).reshape(want.shape)
    _assert_close_away_from_threshold(cc, blocks, got_alone, want_alone, _rounding(cc, blocks))
    assert not torch.allclose(got_alone, want, atol=1e-3)  # the partner's block matters


def test_tracking_each_generation_step_with_kv_caches_equals_the_full_forward(models, cc):
    base, chat = models
    im = InterpretableModel(chat, {HOOK: OneModel(cc, "chat", partners=[base])})
    prompt = chat.tokenizer.encode("import os\nos.path.join(")
    max_tokens = 6
    with im.track(top_n=None) as trace:
        new = [step.token_ids[0] for step in im.generate([prompt], max_tokens, temperature=0.0)]
        got = dense_latents(*trace.latents(HOOK), D_SAE)[0]
    ids = prompt + new[:-1]  # the last new token is never fed back
    assert got.shape[0] == len(ids) == len(prompt) + max_tokens - 1
    # each step's latents are the crosscoder's encode of both models' activations as the KV caches give them
    cached = [_cached_acts(nc, ids, len(prompt)) for nc in models]
    want_cached = _encode(cc, cached)
    _assert_close_away_from_threshold(cc, cached, got, want_cached, _rounding(cc, cached))
    # and those equal the full-sequence forward's latents up to the cached forward's own fp32 rounding:
    # a latent moves by at most |Δx| |W_enc| (ReLU is 1-Lipschitz) plus the encode's rounding
    full = _acts(models, torch.tensor([ids]))
    want_full = _encode(cc, full)
    dx = (torch.cat(cached, -1) - torch.cat(full, -1)).reshape(-1, cc.config.d_in).abs() * cc.input_scales()
    tol = dx @ cc.W_enc.abs() + _rounding(cc, full) + _rounding(cc, cached)
    _assert_close_away_from_threshold(cc, full, got, want_full, tol)
    # the tracked steps did not change the greedy generation
    plain = [step[0] for step in chat.model.generate([prompt], max_tokens, temperature=0.0)]
    assert plain == new


def test_steered_generation_runs_the_partners_unsteered_on_the_generated_tokens(models, cc):
    base, chat = models
    im = InterpretableModel(chat, {HOOK: OneModel(cc, "chat", partners=[base])})
    prompt = chat.tokenizer.encode("import os\nos.path.join(")
    max_tokens, latent = 6, 3
    plain = [step[0] for step in chat.model.generate([prompt], max_tokens, temperature=0.0)]
    with im.steering([Steer(HOOK, latent, "add", 200.0)]), im.track(top_n=None) as trace:
        new = [step.token_ids[0] for step in im.generate([prompt], max_tokens, temperature=0.0)]
        got = dense_latents(*trace.latents(HOOK), D_SAE)[0]
    assert new != plain  # the steer changed what the chat model wrote
    ids = prompt + new[:-1]
    # the hook's input is upstream of the edit, so both models' activations there are their clean ones on the
    # generated tokens (the partner gets no steer): the latents are their encode, latent 3 moved by +200 past BOS
    cached = [_cached_acts(nc, ids, len(prompt)) for nc in models]
    want = _encode(cc, cached)
    want[1:, latent] += 200.0
    tol = _rounding(cc, cached)
    tol[1:, latent] += 2 * want[1:, latent].abs() * EPS  # f + 200 rounded on each side: half an ulp each
    _assert_close_away_from_threshold(cc, cached, got, want, tol)


def test_clamp_of_an_exact_latent_sets_exactly_that_value(models, cc):
    base, chat = models
    view = OneModel(cc, "chat", partners=[base])
    im = InterpretableModel(chat, {HOOK: view})
    idx = torch.tensor([chat.tokenizer.encode("return the length of an object")])
    x = _acts(models, idx)
    f = _encode(cc, x)
    latent = int((f > 0).sum(0).argmax())
    keep = (idx != chat.tokenizer.bos_id).reshape(-1, 1)
    with torch.no_grad():
        # the model's own activation moves by (v - f_exact) d^chat / s_chat at non-BOS positions
        edit = keep * (3.0 - f[:, [latent]]) * cc.W_dec[latent, cc.d_model:] / float(cc.input_scale[1])
        by_hand = chat.model(idx, hooks={HOOK: lambda h: (h.reshape(-1, cc.d_model) + edit).view_as(h)})
        with im.steering([Steer(HOOK, latent, "clamp", 3.0)]), im.track(top_n=None) as trace:
            steered = im(idx)
    assert torch.allclose(steered, by_hand, atol=1e-5)
    got = dense_latents(*trace.latents(HOOK), D_SAE).reshape(f.shape)
    assert bool((got[keep[:, 0], latent] == 3.0).all())  # the recorded value is exactly the clamp
    assert torch.equal(got[~keep[:, 0], latent], f[~keep[:, 0], latent])  # BOS is never steered
    # without partners the clamp reads the approximate value, so the edit differs
    alone = InterpretableModel(chat, {HOOK: OneModel(cc, "chat")})
    with torch.no_grad(), alone.steering([Steer(HOOK, latent, "clamp", 3.0)]):
        assert not torch.allclose(alone(idx), by_hand, atol=1e-4)


def test_partner_mistakes_are_refused_in_one_line(models, cc, nanochat_current_dir):
    base, chat = models
    other = load_nanochat(nanochat_current_dir, device="cpu", dtype=torch.float32)  # a tiny model, its own tokenizer
    with pytest.raises(SAELightningError, match="partner 'base' has width") as err:
        OneModel(cc, "chat", partners=[other])
    assert "\n" not in str(err.value)
    with pytest.raises(SAELightningError, match="give the 1 other one"):
        OneModel(cc, "chat", partners=[base, base])
    # same width and vocabulary, another tokenizer: a GPT of the demo's shape read with the tiny tokenizer
    foreign = type(base)(base.model, other.tokenizer, base.meta)
    with pytest.raises(SAELightningError, match="partner 'base' has another tokenizer") as err:
        InterpretableModel(chat, {HOOK: OneModel(cc, "chat", partners=[foreign])})
    assert "\n" not in str(err.value)
    # the hooks alone (without forward, which runs the partners) refuse rather than fall back to the block alone
    im = InterpretableModel(chat, {HOOK: OneModel(cc, "chat", partners=[base])})
    idx = torch.tensor([chat.tokenizer.encode("def")])
    with im.track(), pytest.raises(SAELightningError, match="only InterpretableModel's forward computes"):
        chat.model(idx, hooks=im.hooks(idx))
    # a KV cache filled outside it: the partners never saw those positions
    cache = KVCache(chat.model.n_layer)
    chat.model(idx, kv_cache=cache)
    with pytest.raises(SAELightningError, match="holds 2 positions the crosscoder's partners never saw"):
        im(torch.tensor([[5]]), kv_cache=cache)


def _export(cc, models, out):
    info = [{"name": name, "path": nc.meta["path"], "step": nc.meta["step"], "era": nc.meta["era"]}
            for name, nc in zip(["base", "chat"], models)]
    return save_sae(cc, out, metadata={"hook_name": HOOK, "models": info})


def test_features_cli_reads_a_crosscoder_exactly_with_its_partners_loaded_from_cfg_json(models, cc, tmp_path,
                                                                                         capsys):
    path = _export(cc, models, tmp_path / "cc")
    text = "def len(obj): return the number of items"
    assert main(["features", "--sae", str(path), "--crosscoder-model", "chat", "--text", text,
                 "--top-features", "3", "--device", "cpu"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    loaded = load_sae(path)
    idx = torch.tensor([models[1].tokenizer.encode(text)])
    f = loaded.encode(torch.cat(_acts(models, idx), -1)[0])  # the export works on raw activations
    assert len(rows) == idx.shape[1]
    for row, want in zip(rows, f):
        shown = re.search(r"\[(.*)\]$", row).group(1).split()
        values, indices = want.topk(3)
        expected = [f"{i}:{v:.2f}" for i, v in zip(indices.tolist(), values.tolist()) if v > 0]
        assert shown == expected, (row, expected)
    # generate: the same view, one token per step
    assert main(["generate", "--sae", str(path), "--crosscoder_model", "chat", "--prompt", "import", "--max_tokens",
                 "2", "--clamp", f"{int(f.sum(0).argmax())}:2.0", "--device", "cpu"]) == 0
    assert "--- completion 0: import" in capsys.readouterr().out


@pytest.mark.parametrize("extra, fragment", [
    ([], "is a crosscoder over the models \\['base', 'chat'\\]; pass --crosscoder_model NAME"),
    (["--crosscoder_model", "rl"], "no model named 'rl'"),
    (["--crosscoder_model", "chat", "--model", "demo"], "--model does not apply to a crosscoder"),
    (["--crosscoder_model", "chat", "--models", "demo"], "--models gives 1 model\\(s\\) but the crosscoder reads 2"),
])
def test_cli_crosscoder_mistakes_are_one_line_errors(models, cc, tmp_path, capsys, extra, fragment):
    path = _export(cc, models, tmp_path / "cc")
    assert main(["features", "--sae", str(path), "--text", "def", "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(fragment, err) and "\n" not in err, err
