"""runtime.py: tracking, steering and KV-cache generation through InterpretableModel."""

import pytest
import torch

from saelightning.errors import SAELightningError
from saelightning.runtime import InterpretableModel, Steer, parse_steer
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
    from saelightning.cli import main
    from saelightning.export import load_sae, save_sae
    from saelightning.nanochat.checkpoint import load_nanochat

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
