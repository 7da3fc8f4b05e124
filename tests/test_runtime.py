"""runtime.py: tracking, steering and KV-cache generation through InterpretableModel."""

import pytest
import torch
import yaml

from saelightning.cli import main
from saelightning.errors import SAELightningError
from saelightning.export import load_sae, save_sae
from saelightning.nanochat.checkpoint import load_nanochat
from saelightning.runtime import ContextWarning, InterpretableModel, Steer, dense_latents, parse_steer
from saelightning.saes import SAEConfig, build_sae
from tests.test_evaluate import tiny_model

pytestmark = pytest.mark.numerics  # fp32 results compared across code paths: also run under other CPU kernels

MID = "blocks.1.hook_resid_mid"
POST = "blocks.1.hook_resid_post"
MLP = "blocks.0.mlp.hook_post"
BOS = 500


def make_sae(d_in, d_sae, hook, seed=0, architecture="topk", k=6):
    torch.manual_seed(seed)
    extra = {"k": k} if architecture == "topk" else {}
    sae = build_sae(SAEConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, **extra))
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.1)
    sae.metadata = {"hook_name": hook}
    return sae.eval().requires_grad_(False)


@pytest.fixture
def im():
    model = tiny_model()
    return InterpretableModel(model, [make_sae(32, 64, MID, 1), make_sae(128, 96, MLP, 2)], bos_id=BOS)


def prompts(b=2, t=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, BOS, (b, t), generator=g)
    tokens[:, 0] = BOS
    return tokens


@pytest.mark.parametrize("architecture", ["topk", "relu"])  # sparse and dense deferred-encode paths
def test_tracking_leaves_logits_unchanged_and_records_encode(architecture):
    saes = [make_sae(32, 64, MID, 1, architecture), make_sae(128, 96, MLP, 2, architecture)]
    im = InterpretableModel(tiny_model(), saes, bos_id=BOS)
    tokens = prompts()
    clean = im.model(tokens)
    captured = im.model.run_with_cache(tokens, [MID, MLP])
    with im.track(top_n=4) as trace:
        logits = im(tokens)
    assert torch.equal(logits, clean)
    for hook, sae in im.saes.items():
        values, indices = trace.latents(hook)
        assert values.shape == indices.shape == (2, 7, 4)
        f = sae.encode(captured[hook].reshape(-1, captured[hook].shape[-1])).reshape(2, 7, -1)
        want_v, want_i = f.topk(4, dim=-1)
        torch.testing.assert_close(values, want_v)
        active = want_v > 0
        assert torch.equal(indices[active], want_i[active]) and (indices[~active] == -1).all()
        # every non-recorded latent is smaller than the recorded ones
        assert torch.equal(f.gather(-1, indices.clamp_min(0)) * active, values * active)


def test_tracking_all_active_latents_matches_sparse_encode(im):
    tokens = prompts()
    with im.track(top_n=None) as trace:
        im(tokens)
    values, indices = trace.latents(MID)
    x = im.model.run_with_cache(tokens, [MID])[MID]
    f = im.saes[MID].encode(x)
    assert values.shape[-1] == 6  # topk k=6: exactly six per token
    dense = torch.zeros_like(f).scatter(-1, indices.clamp_min(0), values * (indices >= 0))
    torch.testing.assert_close(dense, f)


def test_tracking_a_steered_hook_records_the_steered_latents(im):
    tokens = prompts()
    x = im.model.run_with_cache(tokens, [MID])[MID]
    f = im.saes[MID].encode(x)
    with im.steering([Steer(MID, 9, "clamp", 50.0)]), im.track(top_n=2) as trace:
        im(tokens)
    values, indices = trace.latents(MID)
    # latent 9 clamped to 50 tops every non-BOS token; the runner-up is the SAE's own largest other latent
    assert (indices[:, 1:, 0] == 9).all() and (values[:, 1:, 0] == 50.0).all()
    others = f[:, 1:].clone()
    others[..., 9] = 0
    torch.testing.assert_close(values[:, 1:, 1], others.max(-1).values)
    torch.testing.assert_close(values[:, 0], f[:, 0].topk(2).values)  # BOS: not steered


def test_noop_steers_are_bit_identical(im):
    tokens = prompts()
    clean = im.model(tokens)
    noop = [Steer(MID, 3, "add", 0.0), Steer(MID, 5, "scale", 1.0), Steer(MLP, 7, "add", 0.0)]
    with im.steering(noop):
        assert torch.equal(im(tokens), clean)
        with im.track(top_n=3):
            assert torch.equal(im(tokens), clean)


def test_steering_keeps_the_error_term(im):
    """x + (f' - f) W_dec: the edit is exactly the changed latents' decoder rows, nothing else."""
    tokens = prompts()
    sae, x = im.saes[MID], im.model.run_with_cache(tokens, [MID])[MID]
    f = sae.encode(x)
    with im.steering([Steer(MID, 2, "clamp", 3.0), Steer(MID, 9, "scale", 0.0), Steer(MID, 11, "add", -1.5)]):
        edited = im.hooks(tokens)[MID](x)
    delta = (3.0 - f[..., 2:3]) * sae.W_dec[2] + (-f[..., 9:10]) * sae.W_dec[9] - 1.5 * sae.W_dec[11]
    want = torch.where((tokens != BOS)[..., None], x + delta, x)
    torch.testing.assert_close(edited, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(edited[:, 0], x[:, 0])  # BOS positions are never steered


def test_steering_raises_the_planted_token():
    """A latent whose decoder row is a token's unembedding direction: steering it makes that token likelier."""
    model = tiny_model()
    sae = make_sae(32, 64, POST, 4)
    target, latent = 123, 17
    with torch.no_grad():
        direction = model.lm_head.weight[target] - model.lm_head.weight[:500].mean(0)
        sae.W_dec[latent] = direction / direction.norm()
    im = InterpretableModel(model, [sae], bos_id=BOS)
    tokens = prompts(b=3)
    p0 = im(tokens).softmax(-1)[:, 1:, target]
    with im.steering([Steer(POST, latent, "add", 2.0)]):
        p1 = im(tokens).softmax(-1)[:, 1:, target]
    with im.steering([Steer(POST, latent, "add", 40.0)]):
        top = im(tokens)[:, 1:].argmax(-1)
    with im.steering([Steer(POST, latent, "add", -2.0)]):
        p2 = im(tokens).softmax(-1)[:, 1:, target]
    assert (p1 > p0).all() and (p2 < p0).all()
    assert (top == target).all()


def greedy_full_forward(im, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(im(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("mode", ["plain", "tracked", "steered"])
def test_kv_cache_generation_equals_full_forward_greedy(im, mode):
    batch = [[BOS, 5, 17, 250], [BOS, 9], [BOS, 44, 3, 10]]  # two lengths: two prefill groups
    steers = [Steer(MID, 4, "add", 3.0), Steer(MLP, 1, "clamp", 2.0)] if mode == "steered" else []
    with im.steering(steers):
        want = [greedy_full_forward(im, p, 8) for p in batch]
        if mode == "tracked":
            with im.track(top_n=3) as trace:
                steps = list(im.generate(batch, 8, temperature=0.0, top_features=3))
            assert len(trace.records[MID]) == 2 + 2 * 7  # two prefills, then one forward per group and step
        else:
            steps = list(im.generate(batch, 8, temperature=0.0))
    got = [[s.token_ids[j] for s in steps] for j in range(3)]
    assert got == want
    assert [s.step for s in steps] == list(range(8))


def test_streamed_features_are_those_of_the_position_fed_in(im):
    prompt = [BOS, 5, 17, 250]
    steps = list(im.generate([prompt], 4, temperature=0.0, top_features=3))
    ids = prompt + [s.token_ids[0] for s in steps]
    with im.track(top_n=3) as trace:
        im(torch.tensor([ids]))
    values, indices = trace.latents(MLP)
    for s in steps:
        pos = len(prompt) - 1 + s.step  # the last token fed before this one was sampled
        want = [(int(i), v) for i, v in zip(indices[0, pos], values[0, pos]) if i >= 0]
        assert [i for i, _ in s.features[MLP][0]] == [i for i, _ in want]
        assert [v for _, v in s.features[MLP][0]] == pytest.approx([float(v) for _, v in want], rel=1e-4)


def test_tracked_generation_keeps_each_prompt_apart(im):
    # two lengths, one prompt each: two batches of the same size, whose records a plain join along T would interleave
    prompts = [[BOS, 5, 17, 250], [BOS, 9]]
    with im.track(top_n=3) as trace:
        steps = list(im.generate(prompts, 5, temperature=0.0))
    with pytest.raises(SAELightningError, match="2 different batches.*prompt_latents"):
        trace.latents(MLP)
    for j, prompt in enumerate(prompts):
        ids = prompt + [s.token_ids[j] for s in steps][:-1]  # the last new token is never fed back
        with im.track(top_n=3) as full:
            im(torch.tensor([ids]))
        want_v, want_i = full.latents(MLP)
        got_v, got_i = trace.prompt_latents(MLP, j)
        assert got_i.shape == want_i[0].shape == (len(ids), 3)
        assert torch.equal(got_i, want_i[0])
        torch.testing.assert_close(got_v, want_v[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(SAELightningError, match="no record at .* holds prompt 2; .* prompts 0..1"):
        trace.prompt_latents(MLP, 2)
    with im.track(top_n=3) as two_calls:
        list(im.generate(prompts[:1], 2, temperature=0.0))
        list(im.generate(prompts[:1], 2, temperature=0.0))
    with pytest.raises(SAELightningError, match="2 generate calls or forwards"):
        two_calls.prompt_latents(MLP, 0)


def test_sampling_is_seeded(im):
    run = lambda seed: [s.token_ids for s in im.generate([[BOS, 5], [BOS, 6]], 6, 1.0, 20, seed)]  # noqa: E731
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_bad_input_is_reported(im):
    with pytest.raises(SAELightningError, match="no SAE"):
        with im.steering([Steer(POST, 1, "add", 1.0)]):
            pass
    with pytest.raises(SAELightningError, match="out of range"):
        with im.steering([Steer(MID, 64, "add", 1.0)]):
            pass
    with pytest.raises(SAELightningError, match="unknown steer mode"):
        Steer(MID, 1, "nudge", 1.0)
    with pytest.raises(SAELightningError, match="HOOK:LATENT:VALUE"):
        parse_steer("blocks.1.hook_resid_mid:x:1", "add")
    assert parse_steer("blocks.1.hook_resid_mid:3:-2.5", "clamp") == Steer(MID, 3, "clamp", -2.5)
    assert parse_steer("3:2", "add", default_hook=MID) == Steer(MID, 3, "add", 2.0)
    with pytest.raises(SAELightningError, match="width is 32"):
        InterpretableModel(im.model, {MID: make_sae(16, 8, MID)})
    with pytest.raises(SAELightningError, match="two SAEs"):
        InterpretableModel(im.model, [make_sae(32, 8, MID), make_sae(32, 8, MID)])


def test_generate_cli_prints_tokens_with_features(tmp_path, nanochat_current_dir, capsys):
    hook = "blocks.1.hook_resid_post"
    sae_dir = save_sae(make_sae(64, 128, hook, 5), tmp_path / "sae", metadata={"hook_name": hook})
    argv = ["generate", "--model", str(nanochat_current_dir), "--sae", str(sae_dir), "--prompt", "the model reads",
            "--max-tokens", "5", "--top-features", "3", "--steer", f"{hook}:3:2.5", "--clamp", "7:1.0",
            "--device", "cpu"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()

    nc = load_nanochat(nanochat_current_dir, device="cpu", dtype=torch.float32)
    im = InterpretableModel(nc, [load_sae(sae_dir)])
    with im.steering([Steer(hook, 3, "add", 2.5), Steer(hook, 7, "clamp", 1.0)]):
        steps = list(im.generate("the model reads", 5, temperature=0.0, top_features=3))
    step_lines = [ln for ln in lines if ln.split()[0].isdigit()]
    assert len(step_lines) == 5
    for line, step in zip(step_lines, steps):
        assert repr(step.tokens[0]) in line
        shown = " ".join(f"{i}:{v:.2f}" for i, v in step.features[hook][0])
        assert f"{hook}[{shown}]" in line and len(step.features[hook][0]) == 3
    completion = nc.tokenizer.decode([s.token_ids[0] for s in steps])
    assert lines[-1] == f"--- completion 0: the model reads{completion}"


# -- the seed extension's names (nanochat PR #169's sae/runtime.py) are the native calls


def test_seed_get_active_features_is_track(im):
    tokens, other = prompts(), prompts(seed=4)
    with im.interpretation_enabled():
        im(other)
        im(tokens)  # the last forward is the one reported
        dense, one, top = im.get_active_features(), im.get_active_features(MID), im.get_active_features(top_k=3)
    with im.track(top_n=None) as trace:
        im(tokens)
    with im.track(top_n=3) as top_trace:
        im(tokens)
    assert set(dense) == set(top) == {MID, MLP} and set(one) == {MID}
    captured = im.model.run_with_cache(tokens, [MID, MLP])
    for hook, sae in im.saes.items():
        values, indices = trace.latents(hook)
        want = dense_latents(values, indices, sae.W_dec.shape[0]).flatten(0, 1)  # [B*T, d_sae], as the seed's
        assert torch.equal(dense[hook], want)
        assert torch.equal(dense[hook], sae.encode(captured[hook].flatten(0, 1)))
        v, i = top_trace.latents(hook)
        got_i, got_v = top[hook]  # the seed's order: (indices, values)
        assert torch.equal(got_v, v.flatten(0, 1))
        active = got_v > 0
        assert torch.equal(got_i[active], i.flatten(0, 1)[active]) and (got_i[~active] == -1).all()
    assert torch.equal(one[MID], dense[MID])


def test_seed_get_active_features_of_steered_hooks_and_its_errors(im):
    tokens = prompts()
    with im.steering([Steer(MID, 9, "clamp", 50.0)]):
        with im.interpretation_enabled():
            im(tokens)
            steered = im.get_active_features(MID)[MID]
        with im.track(top_n=None) as trace:
            im(tokens)
    values, indices = trace.latents(MID)
    assert torch.equal(steered, dense_latents(values, indices, 64).flatten(0, 1))
    assert (steered.view(2, 7, -1)[:, 1:, 9] == 50.0).all()
    with pytest.raises(SAELightningError, match="inside `with m.interpretation_enabled"):
        im.get_active_features()
    with im.interpretation_enabled():
        assert im.get_active_features() == {}  # no forward yet: nothing, as the seed's
        with pytest.raises(SAELightningError, match="no features for 'blocks.1.hook_resid_mid' yet"):
            im.get_active_features(MID)
        with pytest.raises(SAELightningError, match="no SAE on 'blocks.1.hook_resid_post'"):
            im.get_active_features(POST)
        with pytest.raises(SAELightningError, match="tracking is already on"):
            with im.track():
                pass
    with pytest.raises(SAELightningError, match="inside `with m.interpretation_enabled"):
        im.get_active_features()  # dropped when the block ends, as the seed's


def test_seed_steering_enabled_and_steer_are_steering(im):
    tokens = prompts()
    clean = im(tokens)
    config = {MID: (4, 2.0), MLP: [(1, -1.0), (3, 0.5)]}
    native = [Steer(MID, 4, "add", 2.0), Steer(MLP, 1, "add", -1.0), Steer(MLP, 3, "add", 0.5)]
    with im.steering_enabled(config) as m:
        assert m is im and im.steers == native
        seed = im(tokens)
    with im.steering(native):
        want = im(tokens)
    assert im.steers == [] and torch.equal(seed, want) and not torch.equal(seed, clean)
    with im.steering([Steer(MID, 4, "add", 2.0)]):
        want = im(tokens)
    assert torch.equal(im.steer(tokens, feature_id=(MID, 4), strength=2.0), want)
    with im.steering([Steer(MID, 4, "scale", 3.0)]):
        want = im(tokens)
    assert torch.equal(im.steer(tokens, (MID, 4), 3.0, mode="scale"), want)
    assert torch.equal(im.steer(tokens, (MID, 4), 0.0), clean)  # a no-op steer: bit-identical
    with pytest.raises(SAELightningError, match=r"give \(feature_idx, strength\)"):
        with im.steering_enabled({MID: 4}):
            pass
    with pytest.raises(SAELightningError, match=r"give \(feature_idx, strength\)"):
        with im.steering_enabled({MID: (4.5, 1.0)}):
            pass
    with pytest.raises(SAELightningError, match="no SAE"):
        im.steer(tokens, (POST, 4), 1.0)
    assert im.steers == []


# -- features on every token of a prompt


def export_sae(tmp_path, model_dir, hook="blocks.1.hook_resid_post", seed=5):
    """An exported SAE whose cfg.json records the model it was trained on (so --model can be left out)."""
    metadata = {"hook_name": hook, "trained_on": {"model": str(model_dir)}}
    return save_sae(make_sae(64, 128, hook, seed), tmp_path / f"sae{seed}", metadata=metadata)


def test_prompt_features_are_the_sae_encode_at_every_position(tmp_path, nanochat_current_dir):
    nc = load_nanochat(nanochat_current_dir, device="cpu", dtype=torch.float32)
    saes = [load_sae(export_sae(tmp_path, nanochat_current_dir)),
            load_sae(export_sae(tmp_path, nanochat_current_dir, "blocks.0.hook_resid_mid", 6))]
    im = InterpretableModel(nc, saes)
    pf = im.prompt_features("the model reads the model", top_n=4)
    ids = nc.tokenizer.encode("the model reads the model")
    assert pf.token_ids == ids and pf.tokens == [nc.tokenizer.token_str(t) for t in ids]
    acts = nc.model.run_with_cache(torch.tensor([ids]), list(im.saes))
    for hook, sae in im.saes.items():
        values, indices = pf.latents[hook]
        assert values.shape == (len(ids), 4)
        want_v, want_i = sae.encode(acts[hook][0]).topk(4, dim=-1)
        assert torch.equal(values, want_v)
        active = want_v > 0
        assert torch.equal(indices[active], want_i[active]) and (indices[~active] == -1).all()


def _shown(line: str, hook: str) -> list[tuple[int, str]]:
    inner = line.split(f"{hook}[", 1)[1].split("]", 1)[0]
    return [(int(i), v) for i, v in (p.split(":") for p in inner.split())]


def test_features_cli_prints_every_token_with_its_top_latents(tmp_path, nanochat_current_dir, capsys):
    a, b = export_sae(tmp_path, nanochat_current_dir), export_sae(tmp_path, nanochat_current_dir, MID, 6)
    text = "the model reads\n  the model"
    # no --model: it comes from the SAEs' cfg.json
    assert main(["features", "--sae", str(a), str(b), "--text", text, "--top-features", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert out.err == "" and lines[0].split()[:2] == ["pos", "token"]

    nc = load_nanochat(nanochat_current_dir, device="cpu", dtype=torch.float32)
    ids = nc.tokenizer.encode(text)
    acts = nc.model.run_with_cache(torch.tensor([ids]), [POST, MID])
    assert len(lines) == 1 + len(ids)
    for pos, (line, tid) in enumerate(zip(lines[1:], ids)):
        assert line.split()[0] == str(pos) and repr(nc.tokenizer.token_str(tid)) in line
        for hook, sae_dir in ((POST, a), (MID, b)):
            values, indices = load_sae(sae_dir).encode(acts[hook][0, pos]).topk(3)
            assert _shown(line, hook) == [(int(i), f"{v:.2f}") for i, v in zip(indices, values) if v > 0]
    assert any("\\n" in line for line in lines)  # whitespace shows: tokens are printed as repr

    assert main(["features", "--text", text, "--model", str(nanochat_current_dir)]) == 2
    assert "--sae is required" in capsys.readouterr().err
    # one jsonargparse definition: --print_config's YAML given back with --config is the same configuration
    assert main(["features", "--sae", str(a), "--text", text, "--top-features", "2", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["sae"] == [str(a)] and printed["text"] == text and printed["top_features"] == 2
    config = tmp_path / "features.yaml"
    config.write_text(yaml.safe_dump(printed))
    assert main(["features", "--config", str(config), "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == printed


# -- prompts and generation longer than the context (tiny_model: sequence_len 64)


def test_a_long_prompt_is_cut_on_the_left_or_refused(im):
    assert im.context == 64
    long = [BOS, *range(1, 80)]  # 80 tokens
    (cut,), notes = im.fit_context(long)
    assert cut == [BOS, *range(17, 80)] and len(cut) == 64  # <|bos|> and the last 63
    assert len(notes) == 1 and "80 tokens, longer than the model's context of 64" in notes[0]
    assert "<|bos|> and its last 63 tokens" in notes[0]
    (cut,), _ = im.fit_context([list(range(1, 81))])
    assert cut == list(range(17, 81))  # no <|bos|>: the last 64
    assert im.fit_context([long[:64]], "error") == ([long[:64]], [])
    with pytest.raises(SAELightningError, match=r"is 80 tokens, longer than the model.s context of 64.*truncate left"):
        im.fit_context(long, "error")
    assert im.fit_context(long, None) == ([long], [])
    with pytest.raises(SAELightningError, match="unknown truncate 'right'"):
        im.fit_context(long, "right")

    with pytest.warns(ContextWarning, match="longer than the model's context"):
        pf = im.prompt_features(long, top_n=3)
    assert pf.token_ids == [BOS, *range(17, 80)]
    want = im.prompt_features(pf.token_ids, top_n=3, truncate=None)
    for hook in im.saes:
        assert all(torch.equal(x, y) for x, y in zip(pf.latents[hook], want.latents[hook]))
    with pytest.raises(SAELightningError, match="longer than the model's context"):
        im.prompt_features(long, truncate="error")


def test_generation_past_the_context_warns_or_is_refused(im):
    prompt = [BOS, *range(1, 60)]  # 60 tokens: 5 new ones run the model over 64 positions, 6 over 65
    assert im.fit_context([prompt], "error", max_tokens=5) == ([prompt], [])
    _, notes = im.fit_context([prompt], "left", max_tokens=6)
    assert len(notes) == 1 and "run the model over 65 positions, past its context of 64" in notes[0]
    assert "--max_tokens 5 stays inside it" in notes[0]
    with pytest.raises(SAELightningError, match=r"over 65 positions.*lower --max_tokens to 5.*--truncate left"):
        im.fit_context([prompt], "error", max_tokens=6)
    with pytest.raises(SAELightningError, match="past its context"):
        list(im.generate([prompt], 6, temperature=0.0, truncate="error"))

    long = [BOS, *range(1, 100)]  # cut to 64, then 8 steps past the context: warned, and it runs
    with pytest.warns(ContextWarning) as caught:
        got = [s.token_ids[0] for s in im.generate([long], 8, temperature=0.0)]
    assert len(caught) == 2
    assert got == [s.token_ids[0] for s in im.generate([[BOS, *range(37, 100)]], 8, temperature=0.0, truncate=None)]
    _, notes = InterpretableModel(tiny_model("original"), {}, bos_id=BOS).fit_context([prompt], max_tokens=6)
    assert "distances the model was never trained on" in notes[0]  # full attention, not sliding windows
    _, notes = im.fit_context([[BOS, 1], prompt], max_tokens=6)
    assert notes[0].startswith("prompt 1's 60 tokens")  # several prompts: the longest is named


def test_cli_prompt_longer_than_the_context(tmp_path, nanochat_current_dir, capsys):
    sae = export_sae(tmp_path, nanochat_current_dir)
    nc = load_nanochat(nanochat_current_dir, device="cpu", dtype=torch.float32)
    text = "the model reads " * 120
    n = len(nc.tokenizer.encode(text))
    assert n > 256  # the fixture model's sequence_len
    capsys.readouterr()
    assert main(["features", "--sae", str(sae), "--text", text, "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert len(out.out.strip().splitlines()) == 1 + 256
    assert out.err.strip().splitlines() == [f"saelightning: warning: the prompt is {n} tokens, longer than the "
                                            "model's context of 256: only <|bos|> and its last 255 tokens are used "
                                            "(--truncate error refuses instead)"]
    assert main(["features", "--sae", str(sae), "--text", text, "--truncate", "error"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"is {n} tokens, longer than the model's context of 256" in err[0]

    gen = ["generate", "--sae", str(sae), "--prompt", text, "--max-tokens", "3", "--device", "cpu"]
    assert main(gen) == 0
    out = capsys.readouterr()
    warned = out.err.strip().splitlines()
    assert len(warned) == 2 and "longer than the model's context of 256" in warned[0]
    assert "run the model over 258 positions, past its context of 256" in warned[1]
    assert len([ln for ln in out.out.splitlines() if ln.split()[0].isdigit()]) == 3
    assert main([*gen, "--truncate", "error"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "longer than the model's context of 256" in err[0] and "--truncate left" in err[0]
