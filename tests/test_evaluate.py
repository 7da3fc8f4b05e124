"""evaluate.py: every metric against a direct computation, identity/zero SAEs, the eval CLI."""

import json

import pytest
import torch
import torch.nn.functional as F

from saelightning.cli import main
from saelightning.errors import SAELightningError
from saelightning.evaluate import evaluate_saes, splice_hook
from saelightning.nanochat.model import GPT, GPTConfig
from saelightning.saes import SAEConfig, build_sae

pytestmark = pytest.mark.numerics  # fp32 results compared across code paths: also run under other CPU kernels

HOOK = "blocks.1.hook_resid_mid"
BOS = 500


def tiny_model(era="current"):
    """A 2-layer, 32-wide nanochat with every weight non-zero (nanochat's init zeroes some)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, era=era))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.float().eval().requires_grad_(False)


def relu_sae(W_enc, b_enc, W_dec, b_dec):
    d_in, d_sae = W_enc.shape
    sae = build_sae(SAEConfig(architecture="relu", d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc), sae.b_enc.copy_(b_enc), sae.W_dec.copy_(W_dec), sae.b_dec.copy_(b_dec)
    return sae.eval().requires_grad_(False)


def random_sae(d_in=32, d_sae=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    b_enc = torch.randn(d_sae, generator=g) - 1.5
    b_enc[:4] = -1e4  # four latents that never fire
    return relu_sae(torch.randn(d_in, d_sae, generator=g) / d_in**0.5, b_enc,
                    torch.randn(d_sae, d_in, generator=g) / d_sae**0.5, 0.1 * torch.randn(d_in, generator=g))


def identity_sae(d):
    """relu(x) - relu(-x) = x: a ReLU SAE with 2d latents that reconstructs exactly."""
    eye = torch.eye(d)
    return relu_sae(torch.cat([eye, -eye], 1), torch.zeros(2 * d), torch.cat([eye, -eye], 0), torch.zeros(d))


def zero_sae(d, d_sae=16):
    return relu_sae(torch.zeros(d, d_sae), torch.zeros(d_sae), torch.zeros(d_sae, d), torch.zeros(d))


def tokens_with_bos(b=3, t=20, seed=2):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, BOS, (b, t), generator=g)
    tokens[:, 0] = BOS
    tokens[1, 9] = BOS  # a document boundary inside a row
    return tokens


def direct_metrics(model, sae, tokens):
    """The definitions of SAE_REFERENCE.md written out position by position."""
    x_all = model.run_with_cache(tokens, [HOOK])[HOOK]
    keep = tokens != BOS
    x = x_all[keep].double()
    f = sae.encode(x.float()).double()
    x_hat = sae.decode(f.float()).double()
    spliced = x_all.clone()
    spliced[keep] = x_hat.float()
    zeroed = torch.where(keep[..., None], torch.zeros_like(x_all), x_all)
    log_probs = {name: F.log_softmax(model(tokens, hooks={HOOK: (lambda _, r=r: r)}).double(), -1)
                 for name, r in (("clean", x_all), ("sae", spliced), ("abl", zeroed))}
    ce = {k: [] for k in log_probs}
    kl = {"sae": [], "abl": []}
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            if tokens[b, t] == BOS or tokens[b, t + 1] == BOS:
                continue
            lp = {k: v[b, t] for k, v in log_probs.items()}
            for k in ce:
                ce[k].append(-lp[k][tokens[b, t + 1]].item())
            for k in kl:
                kl[k].append((lp["clean"].exp() * (lp["clean"] - lp[k])).sum().item())
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    ce_c, ce_s, ce_a = mean(ce["clean"]), mean(ce["sae"]), mean(ce["abl"])
    kl_s, kl_a = mean(kl["sae"]), mean(kl["abl"])
    err = (x - x_hat).pow(2).sum(-1)
    return {
        "mse": err.mean().item() / x.shape[1],
        "explained_variance": 1 - err.mean().item() / (x - x.mean(0)).pow(2).sum(-1).mean().item(),
        "cossim": F.cosine_similarity(x, x_hat, dim=-1).mean().item(),
        "l2_ratio": (x_hat.norm(dim=-1) / x.norm(dim=-1)).mean().item(),
        "relative_reconstruction_bias": x_hat.pow(2).sum(-1).mean().item() / (x * x_hat).sum(-1).mean().item(),
        "l0": (f != 0).sum(-1).double().mean().item(),
        "l1": f.abs().sum(-1).mean().item(),
        "frac_alive": (f != 0).any(0).double().mean().item(),
        "ce_loss_without_sae": ce_c, "ce_loss_with_sae": ce_s, "ce_loss_with_ablation": ce_a,
        "ce_loss_score": (ce_a - ce_s) / (ce_a - ce_c),
        "kl_div_with_sae": kl_s, "kl_div_with_ablation": kl_a, "kl_div_score": (kl_a - kl_s) / kl_a,
        "n_tokens": x.shape[0], "density": (f != 0).double().mean(0),
    }


def scored(model, saes, *batches):
    """{hook: [(metrics, density) per SAE]} over the given token batches."""
    return evaluate_saes(model, saes, list(batches), BOS)


def test_every_metric_matches_direct_computation():
    model, sae, tokens = tiny_model(), random_sae(), tokens_with_bos()
    (got, density), = scored(model, {HOOK: sae}, tokens)[HOOK]
    want = direct_metrics(model, sae, tokens)
    assert 0 < want["l0"] < 48 and 0 < want["frac_alive"] < 1  # the SAE is sparse and has dead latents
    assert got["n_tokens"] == want["n_tokens"] == 3 * 20 - 4
    for key, value in want.items():
        if key == "density":
            torch.testing.assert_close(density, value)
        else:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_batches_combine_by_adding_sums():
    model, tokens = tiny_model(), tokens_with_bos(b=4)
    saes = {HOOK: [random_sae(seed=1), random_sae(seed=3)], "blocks.0.hook_mlp_out": random_sae(seed=4)}
    whole = scored(model, saes, tokens)
    parts = scored(model, saes, tokens[:1], tokens[1:])
    assert len(whole[HOOK]) == 2 and len(whole["blocks.0.hook_mlp_out"]) == 1
    for hook in whole:
        for (fa, _), (fb, _) in zip(whole[hook], parts[hook]):
            for key in fa:
                assert fa[key] == pytest.approx(fb[key], rel=1e-6, abs=1e-9), key


def test_splice_with_error_term_leaves_logits_unchanged():
    model, sae, tokens = tiny_model(), random_sae(), tokens_with_bos()
    clean = model(tokens)
    spliced = model(tokens, hooks={HOOK: splice_hook(sae, tokens != BOS, with_error=True)})
    without = model(tokens, hooks={HOOK: splice_hook(sae, tokens != BOS)})
    torch.testing.assert_close(spliced, clean, rtol=1e-5, atol=1e-5)
    assert (without - clean).abs().max() > 1e-2  # the error term matters for this SAE


@pytest.mark.parametrize("era", ["current", "original"])
def test_identity_sae_scores_one_and_zero_sae_scores_zero(era):
    model, tokens = tiny_model(era), tokens_with_bos()
    (ident, _), (zero, _) = scored(model, {HOOK: [identity_sae(32), zero_sae(32)]}, tokens)[HOOK]
    assert ident["ce_loss_score"] == pytest.approx(1.0, abs=1e-9)
    assert ident["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-9) and ident["kl_div_score"] == pytest.approx(1.0)
    assert ident["explained_variance"] == pytest.approx(1.0) and ident["mse"] == 0.0
    assert ident["cossim"] == pytest.approx(1.0) and ident["l2_ratio"] == pytest.approx(1.0)
    assert zero["ce_loss_score"] == 0.0 and zero["kl_div_score"] == 0.0
    assert zero["l0"] == 0.0 and zero["frac_alive"] == 0.0
    assert abs(ident["ce_loss_with_ablation"] - ident["ce_loss_without_sae"]) > 0.1  # the score is well defined


def test_training_sae_with_input_scale_scores_like_its_folded_export():
    """During fit the SAE reads x * input_scale; its scores must equal those of the folded copy."""
    model, tokens = tiny_model(), tokens_with_bos()
    sae = random_sae()
    sae.input_scale.fill_(0.37)
    folded = sae.fold_input_scale()
    (live, _), (exported, _) = scored(model, {HOOK: [sae, folded]}, tokens)[HOOK]
    assert exported["l0"] > 0 and float(folded.input_scale) == 1.0
    for key in live:
        assert live[key] == pytest.approx(exported[key], rel=1e-4, abs=1e-6), key


def test_bad_input_is_reported():
    model, tokens = tiny_model(), tokens_with_bos()
    with pytest.raises(SAELightningError, match=r"d_in=16 cannot read hook point .*width is 32"):
        scored(model, {HOOK: random_sae(d_in=16)}, tokens)
    with pytest.raises(SAELightningError, match="unknown hook point"):
        scored(model, {"blocks.0.resid": random_sae()}, tokens)
    with pytest.raises(SAELightningError, match="width is 128"):
        scored(model, {"blocks.0.mlp.hook_post": random_sae()}, tokens)
    with pytest.raises(SAELightningError, match="context >= 2"):
        scored(model, {HOOK: random_sae()}, tokens[:, :1])


def export_sae(directory, hook, d_in, seed=0, k=8):
    from saelightning.export import save_sae

    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(architecture="topk", d_in=d_in, d_sae=4 * d_in, k=k))
    return save_sae(sae, directory, metadata={"hook_name": hook, "context_size": 32})


def test_eval_cli_end_to_end(tmp_path, nanochat_current_dir, tiny_shards_dir, capsys):
    from saelightning.export import load_sae
    from saelightning.metrics import weight_metrics
    from saelightning.nanochat.checkpoint import load_nanochat
    from saelightning.nanochat.shards import list_shards
    from saelightning.resolve import load_saes
    from saelightning.tokens import val_batches

    a = export_sae(tmp_path / "a", "blocks.1.hook_resid_post", 64)
    b = export_sae(tmp_path / "b", "blocks.0.mlp.hook_post", 256, seed=1)
    out = tmp_path / "reports" / "report.json"
    argv = ["eval", "--sae", str(a), str(b), "--model", str(nanochat_current_dir), "--data", str(tiny_shards_dir),
            "--tokens", "200", "--out", str(out), "--batch-size", "3", "--context-size", "32", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ce_loss_score" in printed and "report written to" in printed
    report = json.loads(out.read_text())
    assert report["context_size"] == 32 and report["tokens_evaluated"] == 7 * 32
    assert [e["path"] for e in report["saes"]] == [str(a), str(b)]
    assert [e["hook_name"] for e in report["saes"]] == ["blocks.1.hook_resid_post", "blocks.0.mlp.hook_post"]
    assert [len(e["feature_density"]) for e in report["saes"]] == [256, 1024]

    # the same numbers straight from the library on the same 7 rows of 32 tokens, in the same batches of 3
    # rows: equal work, so equal to the last bit (fp32 sums change with the batch shape, not between calls)
    nc = load_nanochat(nanochat_current_dir, device="cpu", dtype=torch.float32)
    rows = list(val_batches(list_shards(tiny_shards_dir)[1], nc.tokenizer, 32, 7, 3))
    assert [r.shape for r in rows] == [(3, 32), (3, 32), (1, 32)]
    groups, _ = load_saes([a, b], "cpu")
    direct = evaluate_saes(nc.model, groups, rows, nc.tokenizer.bos_id)
    assert report["saes"][0]["metrics"]["n_tokens"] == int(sum((r != nc.tokenizer.bos_id).sum() for r in rows))
    for entry, (metrics, density) in zip(report["saes"], [direct["blocks.1.hook_resid_post"][0],
                                                          direct["blocks.0.mlp.hook_post"][0]]):
        weights = {k: entry["metrics"].pop(k) for k in ("average_max_encoder_cosine_sim",
                                                        "average_max_decoder_cosine_sim",
                                                        "average_encoder_decoder_cosine_sim")}
        assert entry["metrics"] == metrics
        assert entry["feature_density"] == density.tolist()
        sae = load_sae(entry["path"])
        assert weights == weight_metrics(sae.W_enc, sae.W_dec)
    assert report["saes"][0]["metrics"]["l0"] == pytest.approx(8.0)  # topk k=8
    # without --out the table is printed and nothing is written
    assert main(argv[:argv.index("--out")] + argv[argv.index("--out") + 2:]) == 0
    assert "ce_loss_score" in capsys.readouterr().out


def test_eval_cli_bad_input_exits_2_and_writes_nothing(tmp_path, nanochat_current_dir, tiny_shards_dir, capsys):
    wrong = export_sae(tmp_path / "wrong", "blocks.1.hook_resid_post", 32)
    out = tmp_path / "report.json"
    argv = ["eval", "--sae", str(wrong), "--model", str(nanochat_current_dir), "--data", str(tiny_shards_dir),
            "--tokens", "64", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "d_in=32 cannot read hook point 'blocks.1.hook_resid_post'" in err[0]
    assert not out.exists()
