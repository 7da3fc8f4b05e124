"""SAEModule: lr rule and schedule, param groups, resampling, and a sweep that trains each SAE as if alone."""

import lightning.pytorch as pl
import pytest
import torch

from saelightning.callbacks import ResampleDeadLatents
from saelightning.errors import SAELightningError
from saelightning.module import SAEModule
from saelightning.optim import SkipAdam, WarmupDecay, default_lr

HOOK = "blocks.0.hook_resid_post"


def test_default_lr_and_schedule():
    assert default_lr(2**14) == pytest.approx(2e-4)
    assert default_lr(2**16) == pytest.approx(1e-4)
    schedule = WarmupDecay(warmup=4, decay=10, total=100, end=0.1)
    assert [schedule(s) for s in (0, 1, 3, 4, 50, 89)] == pytest.approx([0.25, 0.5, 1.0, 1.0, 1.0, 1.0])
    assert [schedule(s) for s in (90, 95, 100)] == pytest.approx([1.0, 0.55, 0.1])


def test_param_groups_names_and_bad_specs():
    module = SAEModule(saes=[{"hook_name": HOOK, "d_sae": 64, "k": 4},
                             {"hook_name": "blocks.1.mlp.hook_post", "architecture": "relu", "expansion_factor": 2,
                              "lr": 1e-3, "name": "mlp"}],
                       n_layer=2, d_model=16)
    assert module.hook_names == [HOOK, "blocks.1.mlp.hook_post"]
    assert module.saes["mlp"].config.d_in == 64 and module.saes["mlp"].config.d_sae == 128  # width from the hook
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert [g["name"] for g in groups] == ["blocks_0_hook_resid_post-topk-64", "mlp"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([default_lr(64), 1e-3])  # before warm-up
    assert module.prefix("mlp") == "mlp/"
    with pytest.raises(SAELightningError, match=r"unknown SAE field\(s\) \['l1_coef'\]"):
        SAEModule(saes=[{"hook_name": HOOK, "options": {"l1_coef": 1.0}}], n_layer=2, d_model=16)
    with pytest.raises(SAELightningError, match="l1_coefficient do\\(es\\) not apply to architecture 'topk'"):
        SAEModule(saes=[{"hook_name": HOOK, "l1_coefficient": 1.0}], n_layer=2, d_model=16)
    with pytest.raises(SAELightningError, match="d_sae=0 must be a positive integer"):
        SAEModule(saes=[{"hook_name": HOOK, "d_sae": 0}], n_layer=2, d_model=16)
    # an earlier version's checkpoint kept the options in a dict: it still loads
    old = SAEModule(saes=[{"hook_name": HOOK, "architecture": "relu", "d_sae": 32, "options": {"l1_coefficient": 2.0}}],
                    n_layer=2, d_model=16)
    assert next(iter(old.saes.values())).config.l1_coefficient == 2.0
    with pytest.raises(SAELightningError, match="unknown hook point"):
        SAEModule(saes=[{"hook_name": "blocks.0.resid"}], n_layer=2, d_model=16)
    with pytest.raises(SAELightningError, match="invalid or repeated"):
        SAEModule(saes=[{"hook_name": HOOK, "name": "a"}, {"hook_name": HOOK, "name": "a"}], n_layer=2, d_model=16)


def test_gradient_clip_is_in_saelens_units_for_every_architecture():
    module = SAEModule(saes=[{"hook_name": HOOK, "d_sae": 64, "k": 4, "name": "topk"},
                             {"hook_name": HOOK, "architecture": "relu", "d_sae": 64, "name": "relu"}],
                       n_layer=2, d_model=16, grad_clip=0.5)
    for sae in module.saes.values():
        for p in sae.parameters():
            p.grad = torch.full_like(p, 10.0)
    module.configure_gradient_clipping(None)
    norm = {name: torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in sae.parameters()]))
            for name, sae in module.saes.items()}
    assert norm["topk"] == pytest.approx(0.5 / 16, rel=1e-4)  # fvu loss: the clip in E||x - x̂||² units / d_in
    assert norm["relu"] == pytest.approx(0.5, rel=1e-4)  # summed squared error: the clip as given


def _relu_module():
    torch.manual_seed(0)
    return SAEModule(saes=[{"hook_name": HOOK, "architecture": "relu", "d_sae": 32, "name": "s"}],
                     n_layer=2, d_model=16, dead_window_tokens=100, warmup_steps=1)


def _stepped(module, x):
    """One Adam step so that every parameter has non-zero moments."""
    optimizer = module.configure_optimizers()["optimizer"]
    module.saes["s"](x)[2]["loss"].backward()
    optimizer.step()
    return optimizer


def test_resampling_revives_dead_latents_and_resets_exactly_their_adam_state():
    x = torch.randn(64, 16) * 2
    module = _relu_module()
    optimizer = _stepped(module, x)
    sae = module.saes["s"]
    dead = torch.tensor([3, 7, 11])
    module.since_fired("s")[dead] = 1000  # dead over the window
    params = {n: p.detach().clone() for n, p in sae.named_parameters()}
    moments = {n: {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v) and v.dim() > 0}
               for n, p in sae.named_parameters()}
    counts = ResampleDeadLatents(every_n_steps=1).apply(module, optimizer, {HOOK: x}, step=5)
    assert counts == {"s": 3}
    alive = torch.ones(32, dtype=torch.bool)
    alive[dead] = False
    # the dead rows point at (normalised) inputs; nothing else moved
    torch.testing.assert_close(sae.W_dec[dead].norm(dim=1), torch.ones(3))
    assert torch.equal(sae.W_dec[alive], params["W_dec"][alive])
    assert torch.equal(sae.W_enc[:, alive], params["W_enc"][:, alive])
    assert torch.equal(sae.b_enc[dead], torch.zeros(3))
    assert not torch.equal(sae.W_dec[dead], params["W_dec"][dead])
    # Adam moments: zero on exactly the resampled latents' rows / columns / entries
    for name, axis in (("W_dec", 0), ("W_enc", 1), ("b_enc", 0)):
        for key, before in moments[name].items():
            after = optimizer.state[getattr(sae, name)][key]
            assert torch.equal(after.index_select(axis, dead), torch.zeros_like(after.index_select(axis, dead)))
            keep = alive.nonzero().flatten()
            assert torch.equal(after.index_select(axis, keep), before.index_select(axis, keep))
    for key, before in moments["b_dec"].items():  # no latent axis: untouched
        assert torch.equal(optimizer.state[sae.b_dec][key], before)
    # revived: each fires on the batch it was sampled from, and its dead counter restarts
    assert (sae.encode(x)[:, dead] > 0).any(0).all()
    assert torch.equal(module.since_fired("s")[dead], torch.zeros(3, dtype=torch.long))
    # the same step and seed make the same change (as on every rank)
    again = _relu_module()
    optimizer2 = _stepped(again, x)
    again.since_fired("s")[dead] = 1000
    ResampleDeadLatents(every_n_steps=1).apply(again, optimizer2, {HOOK: x}, step=5)
    assert torch.equal(again.saes["s"].W_dec, sae.W_dec)


def _batches(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"acts": {HOOK: torch.randn(32, 16, generator=g) * 3 + 1,
                      "blocks.1.hook_resid_post": torch.randn(32, 16, generator=g)},
             "scales": {HOOK: 1.0, "blocks.1.hook_resid_post": 1.0}, "index": i} for i in range(n)]


def _fit(specs, batches):
    torch.manual_seed(0)
    module = SAEModule(saes=specs, n_layer=2, d_model=16, warmup_steps=2, dead_window_tokens=64)
    trainer = pl.Trainer(accelerator="cpu", max_steps=len(batches), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=2)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return module


def test_sweep_trains_each_sae_as_if_alone():
    first = {"hook_name": HOOK, "d_sae": 48, "k": 4, "name": "a"}
    other = {"hook_name": "blocks.1.hook_resid_post", "architecture": "relu", "d_sae": 32, "name": "b"}
    alone, sweep = _fit([first], _batches()), _fit([first, other], _batches())
    for name, p in alone.saes["a"].named_parameters():
        assert torch.equal(p, sweep.saes["a"].get_parameter(name)), name
    torch.manual_seed(0)
    untrained = SAEModule(saes=[first, other], n_layer=2, d_model=16)
    assert not torch.equal(sweep.saes["b"].W_dec, untrained.saes["b"].W_dec)  # b trained too, on its own hook
    assert alone.tokens_seen.item() == 6 * 32
    # decoder rows of the TopK SAE stay unit-norm; b_dec was initialised from the first batch then trained
    torch.testing.assert_close(sweep.saes["a"].W_dec.norm(dim=1), torch.ones(48))
    assert sweep.states["a"].initialized.item() and sweep.states["b"].initialized.item()


def test_b_dec_starts_at_the_first_batch_mean_or_at_zero():
    """b_dec_init "mean" (the default) sets b_dec to the first batch's mean; "zeros" (SAELens's) leaves it at 0.
    A tiny lr keeps training from moving it further than 1e-6."""
    batches = _batches(1)
    mean = batches[0]["acts"][HOOK].mean(0)
    specs = [{"hook_name": HOOK, "d_sae": 48, "k": 4, "name": "m", "lr": 1e-9},
             {"hook_name": HOOK, "d_sae": 48, "k": 4, "name": "z", "lr": 1e-9, "b_dec_init": "zeros"}]
    module = _fit(specs, batches)
    torch.testing.assert_close(module.saes["m"].b_dec, mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(module.saes["z"].b_dec, torch.zeros(16), atol=1e-6, rtol=0)
    with pytest.raises(SAELightningError, match="b_dec_init='median' must be 'mean' or 'zeros'"):
        SAEModule(saes=[{"hook_name": HOOK, "d_sae": 48, "b_dec_init": "median"}], n_layer=2, d_model=16)


def _optimizer_state(module) -> list[torch.Tensor]:
    optimizer = module.trainer.optimizers[0]
    return [t for group in optimizer.param_groups for p in group["params"] for t in optimizer.state[p].values()]


@pytest.mark.parametrize("value", [float("nan"), 1e30])  # NaN activations; finite ones whose loss overflows
def test_a_skipped_step_changes_nothing_but_its_count(value):
    """Two good steps then a bad one end exactly where the two good steps alone do: every SAE's weights and
    buffers (BatchTopK's threshold EMA, which the forward updates, included), Adam's moments and step
    counts, the dead tracker, the density window and the token count. No host sync decided any of it."""
    specs = [{"hook_name": HOOK, "d_sae": 48, "k": 4, "name": "a"},
             {"hook_name": HOOK, "architecture": "batchtopk", "d_sae": 48, "k": 4, "name": "c"},
             {"hook_name": "blocks.1.hook_resid_post", "architecture": "relu", "d_sae": 32, "name": "b"}]
    batches = _batches(3)
    batches[2]["acts"][HOOK][5, 3] = value
    skipped, clean = _fit(specs, batches), _fit(specs, batches[:2])
    assert skipped.nonfinite_skipped.item() == 1 and clean.nonfinite_skipped.item() == 0
    assert skipped.trainer.global_step == 3
    state, reference = skipped.state_dict(), clean.state_dict()
    for key in reference:
        if key != "guard.skipped":
            assert torch.equal(state[key], reference[key]), key
    assert skipped.saes["c"].threshold_updates.item() == 2
    for got, want in zip(_optimizer_state(skipped), _optimizer_state(clean), strict=True):
        assert torch.equal(got, want)


def test_an_sae_with_non_finite_gradients_is_skipped_alone():
    module = SAEModule(saes=[{"hook_name": HOOK, "d_sae": 64, "k": 4, "name": "a"},
                             {"hook_name": HOOK, "architecture": "relu", "d_sae": 64, "name": "b"}],
                       n_layer=2, d_model=16)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, SkipAdam) and all(g["fused"] for g in optimizer.param_groups)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    for name, sae in module.saes.items():
        for p in sae.parameters():
            p.grad = torch.full_like(p, 0.01)
    module.saes["b"].W_enc.grad[0, 0] = float("inf")
    module.configure_gradient_clipping(optimizer)
    optimizer.step()
    assert module.nonfinite_skipped.item() == 1
    for n, p in module.named_parameters():
        assert torch.equal(p, before[n]) == n.startswith("saes.b."), n
    assert all(optimizer.state[p]["step"].item() == 1 for p in module.saes["a"].parameters())
    assert all(not optimizer.state[p] or optimizer.state[p]["step"].item() == 0 for p in module.saes["b"].parameters())
    assert not optimizer.skip  # the flags last one step


def test_skip_adam_equals_adam_and_honours_an_outside_found_inf():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = SkipAdam([{"params": params[:1], "name": "x"}, {"params": params[1:], "name": "y"}], lr=0.1)
    plain = torch.optim.Adam([{"params": copies[:1]}, {"params": copies[1:]}], lr=0.1, fused=True)
    for step in range(3):
        for p, c in zip(params, copies):
            p.grad = torch.randn_like(p)
            c.grad = p.grad.clone()
        ours.skip["y"] = torch.tensor(float(step == 1))  # y skips step 1
        ours.step()
        if step != 1:
            plain.step()
        else:  # the plain optimizer updates x alone
            plain.param_groups[1]["params"], held = [], plain.param_groups[1]["params"]
            plain.step()
            plain.param_groups[1]["params"] = held
        for p, c in zip(params, copies):
            assert torch.equal(p, c)
    ours.found_inf = torch.tensor(1.0)  # as a GradScaler sets it: every group skips
    frozen = [p.detach().clone() for p in params]
    ours.step()
    assert all(torch.equal(p, f) for p, f in zip(params, frozen))
    assert torch.equal(ours.found_inf, torch.tensor(1.0))  # left for its owner to remove


def test_a_checkpoint_with_the_earlier_buffer_names_loads():
    """Before SAEState and the NonFiniteGuard, the buffers were '<buffer>__<name>' and 'nonfinite_skipped'."""
    from saelightning.module import upgrade_state_dict

    module = SAEModule(saes=[{"hook_name": HOOK, "d_sae": 64, "k": 4, "name": "a"}], n_layer=2, d_model=16)
    module.states["a"].since_fired.fill_(7)
    module.guard.skipped.fill_(3)
    old = {}
    for key, value in module.state_dict().items():
        if key == "states.a.density_tokens":  # a later buffer: those checkpoints have none
            continue
        if key.startswith("states.a."):
            key = f"{key.rsplit('.', 1)[1]}__a"
        old["nonfinite_skipped" if key == "guard.skipped" else key] = value
    assert "since_fired__a" in old and "nonfinite_skipped" in old
    fresh = SAEModule(saes=[{"hook_name": HOOK, "d_sae": 64, "k": 4, "name": "a"}], n_layer=2, d_model=16)
    fresh.load_state_dict(upgrade_state_dict(old))
    assert fresh.states["a"].since_fired.eq(7).all() and fresh.guard.skipped.item() == 3
    assert fresh.states["a"].density_tokens.isnan()  # the count of a window closed then is unknown
