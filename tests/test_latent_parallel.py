"""Latent parallelism (saes/latent.py): an SAE whose latents are split over gloo processes trains the same SAE as
one process holding them all.

The tolerance, from the numerics: the sharded step computes the same products as the unsharded one; what
changes is the order of a few sums: the decode adds the k (or N·k) chosen rows in another grouping (partials
per shard, then the all-reduce), the encoder's [N, d_in] x [d_in, d_sae/n] product may be blocked differently
from the whole one, and the gradient's sums over the N tokens follow. Each such sum of length L is within
2·L·u (u = 2^-24) of the other order, relative to the size of its terms; `depth` of them in a row (encode,
decode, loss, and the three backward products) compound that. An Adam step moves a parameter by about lr·m/√v,
whose relative error is the gradient's, so after `steps` steps the parameters differ by at most
steps · lr · 2·depth·L·u (with L the longest sum) from that, plus the same relative error on their size; the
unit-norm projection and the moments add nothing of their own order. A real mistake (a wrong winner, a shard's
partial missing, a gradient counted twice) moves parameters by ~lr per step: 10^4 times more.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from saelightning import load_sae
from saelightning.callbacks import resample
from saelightning.cli import main
from saelightning.errors import SAELightningError
from saelightning.evaluate import encode_decode
from saelightning.module import SAEModule, deferred_sae_init
from saelightning.optim import SkipAdam
from saelightning.parallel import LatentParallelStrategy, gather_shards
from saelightning.saes import SAEConfig, build_sae
from saelightning.saes.base import normal_rows
from saelightning.saes.latent import LATENT_AXES, CollectiveCounter, LatentShard, communication_per_step
from saelightning.saes.sparse import SparseLatents
from tests.announce import wait_for
from tests.fits import fit_config
from tests.numerics import UNIT_ROUNDOFF
from tests.test_metrics import _free_port
from tests.test_synthetic import TINY

ROOT = Path(__file__).resolve().parent.parent

D_IN, D_SAE, N, STEPS, LR = 16, 64, 32, 6, 1e-3
CASES = {
    "topk": {"architecture": "topk", "k": 4},
    "topk_rescaled": {"architecture": "topk", "k": 4, "normalize_decoder": False},
    "batchtopk": {"architecture": "batchtopk", "k": 4},
    "matryoshka": {"architecture": "matryoshka", "k": 4, "matryoshka_prefixes": [8, 24, 64]},
    "relu": {"architecture": "relu", "l1_coefficient": 0.5, "l1_warmup_steps": 0},
    "jumprelu": {"architecture": "jumprelu", "l0_coefficient": 0.1, "l1_warmup_steps": 0},
}
DEAD = torch.arange(D_SAE) % 3 == 0  # a third of the latents dead: AuxK across shards


def _data(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(N, D_IN, generator=g) * 2 + 0.5


def _train(sae, dead: torch.Tensor) -> list[torch.Tensor]:
    """STEPS steps as the SAE module takes them: forward, backward, the decoder-gradient projection, clipping,
    SkipAdam, renormalisation. Returns the losses (the same on every rank of a group)."""
    optimizer = SkipAdam([{"params": list(sae.parameters()), "lr": LR, "name": "sae"}], eps=6.25e-10)
    sae.init_from_batch(_data(-1))
    losses = []
    for step in range(STEPS):
        sae.set_training_step(step)
        kwargs = {"sparse": True} if sae.sparse_forward else {}
        _, _, out = sae(_data(step), dead_mask=dead, **kwargs)
        optimizer.zero_grad()
        out["loss"].backward()
        sae.before_optimizer_step()
        sae.clip_grad_norm(10.0)
        optimizer.step()
        sae.after_optimizer_step()
        losses.append(out["loss"].detach())
    return losses


def _build(case: str):
    torch.manual_seed(0)
    return build_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, **CASES[case]))


def _resample(sae) -> dict:
    """DEAD's latents resampled as the resample callback does (training mode, a fixed generator): the whole SAE."""
    sae.train()
    here = resample(sae, DEAD.nonzero().flatten(), _data(50), torch.Generator().manual_seed(3))
    if sae.shard is not None:  # this rank rewrote exactly its own dead latents
        assert torch.equal(here + sae.shard.offset, DEAD.nonzero().flatten()[sae.shard.own(
            DEAD.nonzero().flatten())[1]])
    return {k: v.clone() for k, v in sae.gathered().state_dict().items()}


def _worker(rank, world, port, out_dir, cases=tuple(CASES)):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for case in cases:
        sae = _build(case)
        shard = LatentShard(None, rank, world, D_SAE)
        sae.shard_latents(shard)
        assert sae.W_enc.shape == (D_IN, D_SAE // world) and sae.W_dec.shape == (D_SAE // world, D_IN)
        with CollectiveCounter() as counted:  # the bytes of the STEPS training steps, as they are sent
            losses = _train(sae, DEAD[shard.offset:shard.offset + shard.d_local])
        traffic = torch.tensor([counted.gathered, counted.reduced, counted.broadcast])
        whole = sae.gathered()
        sae.eval()
        x = _data(99)
        eval_latents = sae.encode(x)  # evaluation: global latents, a collective decode
        x_hat = sae.decode(eval_latents).detach()
        f, f_x_hat = encode_decode(sae, x)  # validation's path: sparse latents, nothing [N, d_sae] wide
        assert isinstance(f, SparseLatents) and f.values.shape[-1] < D_SAE
        evaluated = {"f": f.dense(), "x_hat": f_x_hat}
        resampled = _resample(sae)
        torch.save({"state": {k: v.clone() for k, v in whole.state_dict().items()}, "losses": losses,
                    "traffic": traffic, "latents": eval_latents, "x_hat": x_hat, "resampled": resampled,
                    "evaluated": evaluated},
                   os.path.join(out_dir, f"{case}-{rank}.pt"))
    dist.destroy_process_group()


def _tolerance(param: torch.Tensor) -> float:
    depth, longest = 6, max(D_IN, N, D_SAE)
    relative = 2 * depth * longest * UNIT_ROUNDOFF
    return STEPS * LR * relative + relative * float(param.detach().abs().max())


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("latent2")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_two_latent_shards_train_the_same_sae_as_one_process(two_shards, case):
    sae = _build(case)
    want_losses = _train(sae, DEAD)
    sae.eval()
    x = _data(99)
    want_latents = sae.encode(x)
    want = sae.state_dict()
    for rank in (0, 1):
        got = torch.load(two_shards / f"{case}-{rank}.pt", weights_only=True)
        assert got["state"].keys() == want.keys()
        for key, value in want.items():
            if value.is_floating_point():
                torch.testing.assert_close(got["state"][key], value, rtol=0, atol=_tolerance(value), msg=key)
            else:
                assert torch.equal(got["state"][key], value), key
        for got_loss, want_loss in zip(got["losses"], want_losses):
            torch.testing.assert_close(got_loss, want_loss, rtol=_tolerance(torch.ones(())), atol=0)
        # the gathered evaluation latents and their decode are the unsharded SAE's (same active set)
        assert torch.equal(got["latents"] != 0, want_latents != 0)
        torch.testing.assert_close(got["latents"], want_latents, rtol=0, atol=_tolerance(want_latents))
        torch.testing.assert_close(got["x_hat"], sae.decode(want_latents).detach(), rtol=0,
                                   atol=_tolerance(x) * 10)
        # and validation's sparse path gives the same latents and reconstruction as the unsharded SAE's
        want_f, want_x_hat = encode_decode(sae, x)
        assert torch.equal(got["evaluated"]["f"] != 0, want_f != 0)
        torch.testing.assert_close(got["evaluated"]["f"], want_f, rtol=0, atol=_tolerance(want_f))
        torch.testing.assert_close(got["evaluated"]["x_hat"], want_x_hat, rtol=0, atol=_tolerance(x) * 10)
    # the two ranks hold the same replicated state and gather the same whole SAE
    a = torch.load(two_shards / f"{case}-0.pt", weights_only=True)["state"]
    b = torch.load(two_shards / f"{case}-1.pt", weights_only=True)["state"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", list(CASES))
def test_resampling_a_sharded_sae_rewrites_what_resampling_it_whole_does(two_shards, case):
    """The same samples (the same x, the decode's reordered sums change no pick but at a uniform within ~1e-6 of a
    boundary), the same rows and columns, and the mean alive encoder norm over every shard's columns: equal."""
    sae = _build(case)
    _train(sae, DEAD)
    sae.eval()
    want = _resample(sae)
    trained = _build(case)
    _train(trained, DEAD)
    before = trained.state_dict()
    for rank in (0, 1):
        got = torch.load(two_shards / f"{case}-{rank}.pt", weights_only=True)
        for key, value in want.items():
            # rewritten: the dead latents' W_dec rows exactly (normalised samples), the rest as after training
            if key == "W_dec":
                assert torch.equal(got["resampled"][key][DEAD], value[DEAD]), key
                assert not torch.equal(value[DEAD], before[key][DEAD])
            if value.is_floating_point():
                torch.testing.assert_close(got["resampled"][key], value, rtol=0, atol=_tolerance(value), msg=key)


def _traffic_equals_the_formula(out, case, world):
    gathered, reduced = communication_per_step(_build(case).config, world, N)
    for rank in range(world):
        got = torch.load(out / f"{case}-{rank}.pt", weights_only=True)["traffic"].tolist()
        assert got == [STEPS * gathered, STEPS * reduced, 0], (case, rank)


@pytest.mark.parametrize("case", list(CASES))
def test_the_bytes_a_sharded_step_sends_equal_the_formula(two_shards, case):
    """CollectiveCounter counts the all-gathers and all-reduces as they are called; the README's formula
    (communication_per_step) predicts them exactly: a collective more, or a tensor larger, fails."""
    _traffic_equals_the_formula(two_shards, case, 2)


@pytest.mark.slow
def test_the_bytes_on_four_latent_shards_equal_the_formula(tmp_path):
    cases = ("topk", "batchtopk", "matryoshka", "jumprelu")
    mp.spawn(_worker, args=(4, _free_port(), str(tmp_path), cases), nprocs=4, join=True)
    for case in cases:
        _traffic_equals_the_formula(tmp_path, case, 4)


def test_a_d_sae_that_does_not_split_evenly_is_refused():
    with pytest.raises(SAELightningError, match="does not split into 3 equal latent shards"):
        LatentShard(None, 0, 3, 64)


def test_gated_is_refused_with_the_way_out():
    sae = build_sae(SAEConfig(architecture="gated", d_in=D_IN, d_sae=D_SAE))
    with pytest.raises(SAELightningError, match="shard_latents: false"):
        sae.shard_latents(LatentShard(None, 0, 2, D_SAE))


# --- through Lightning: `saelightning fit` under LatentParallelStrategy (gloo on CPU) ---

FIT_STEPS = 6
FIT_SAES = [{"hook_name": "synthetic", "architecture": "topk", "d_sae": 24, "k": 3, "name": "topk"},
            {"hook_name": "synthetic", "architecture": "batchtopk", "d_sae": 24, "k": 3, "name": "batchtopk"},
            # a sweep may mix: this one is held whole by every rank of the latent group
            {"hook_name": "synthetic", "architecture": "relu", "d_sae": 24, "name": "relu", "shard_latents": False}]


def _fit_config(tmp_path, run, latent=None, saes=FIT_SAES, **trainer):
    strategy = {} if latent is None else {
        "strategy": {"class_path": "saelightning.parallel.LatentParallelStrategy",
                     "init_args": {"latent_parallel_size": latent, "process_group_backend": "gloo"}},
        "devices": trainer.pop("devices", latent)}
    data = {"synthetic": {**TINY, "file": str(tmp_path / "model.safetensors")}, "batch_size": 64,
            "buffer_tokens": 256, "num_workers": 0, "val_batches": 2, "scale_batches": 2}
    return fit_config(tmp_path, run, saes, data,
                      {"max_steps": FIT_STEPS, "val_check_interval": 3, "log_every_n_steps": 2, **strategy, **trainer},
                      {"warmup_steps": 2}, checkpoint={"every_n_train_steps": 2}, resample={"every_n_steps": 0})


def _fit(cfg, *extra, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "saelightning", "fit", "--config", str(cfg), *extra], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def _whole_state(ckpt: Path) -> dict:
    checkpoint = torch.load(ckpt, weights_only=True)
    if "latent_shards" in checkpoint:
        return gather_shards(ckpt, checkpoint["state_dict"], checkpoint["latent_shards"])
    return checkpoint["state_dict"]


def _fit_tolerance(value: torch.Tensor) -> float:
    # as _tolerance, for the fit's sums (d_in 12, 64 tokens, 24 latents) and its FIT_STEPS steps at the default
    # lr 2e-4 / sqrt(24 / 2^14) ~ 5.2e-3
    relative = 2 * 6 * 64 * UNIT_ROUNDOFF
    return FIT_STEPS * 5.3e-3 * relative + relative * float(value.abs().max())


@pytest.fixture(scope="module")
def one_process_fit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lp_one")
    assert main(["fit", "--config", str(_fit_config(tmp, "one"))]) == 0
    return tmp / "one"


@pytest.mark.slow
def test_two_process_latent_parallel_fit_equals_one_process_and_exports_one_sae(tmp_path, one_process_fit):
    _fit(_fit_config(tmp_path, "two", latent=2))
    run = tmp_path / "two"
    checkpoint = torch.load(run / "last.ckpt", weights_only=True)
    assert checkpoint["latent_shards"] == {"size": 2, "step": FIT_STEPS}
    assert "saes.topk.W_enc" not in checkpoint["state_dict"]  # the shards are beside it, each written once
    assert sorted(p.name for p in run.glob("last.ckpt.*")) == [f"last.ckpt.step{FIT_STEPS}.shard{r}of2" for r in (0, 1)]
    shard = torch.load(run / f"last.ckpt.step{FIT_STEPS}.shard1of2", weights_only=True)
    assert shard["state_dict"]["saes.topk.W_dec"].shape == (12, 12)  # 24 latents / 2, d_in 12
    assert shard["optimizer_state"]  # and their Adam moments
    want, got = _whole_state(one_process_fit / "last.ckpt"), _whole_state(run / "last.ckpt")
    assert want.keys() == got.keys()
    for key, value in want.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[key], value, rtol=0, atol=_fit_tolerance(value), msg=key)
        else:
            assert torch.equal(got[key], value), key
    # the export is one ordinary SAE per name, equal to the one-process run's
    for name in ("topk", "batchtopk", "relu"):
        a, b = load_sae(one_process_fit / "saes" / name), load_sae(run / "saes" / name)
        assert b.W_enc.shape == (12, 24)
        for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
            torch.testing.assert_close(getattr(b, key), getattr(a, key), rtol=0,
                                       atol=_fit_tolerance(getattr(a, key)) * 4, msg=f"{name}.{key}")
    # validation ran the sharded SAEs on sparse latents: the same figures as the one-process run's (the weights
    # differ by ~1e-5 relative, which moves these continuous means by as much; counts are exact)
    for name in ("topk", "batchtopk", "relu"):
        a, b = load_sae(one_process_fit / "saes" / name), load_sae(run / "saes" / name)
        want_m, got_m = a.metadata["final_metrics"], b.metadata["final_metrics"]
        val = [k for k in want_m if k.startswith("val/")]
        assert val and set(val) <= set(got_m), name
        for key in val:
            assert abs(got_m[key] - want_m[key]) <= 1e-4 * max(1.0, abs(want_m[key])), (name, key)
    # `saelightning export --ckpt` gathers the shards into the same files
    out = tmp_path / "exported"
    assert main(["export", "--ckpt", str(run / "last.ckpt"), "--out", str(out)]) == 0
    assert torch.equal(load_sae(out / "topk").W_dec, load_sae(run / "saes" / "topk").W_dec)


@pytest.mark.slow
def test_four_processes_as_a_2x2_mesh_equal_two_process_ddp(tmp_path):
    """2 data x 2 latent ranks train what 2 data-parallel ranks do with whole SAEs (the same batches per data rank;
    DDP averages the data ranks' gradients in both). Not the 1-process run: each rank's fvu is normalised by its
    own batch's variance, so the average of two halves' gradients is not the whole batch's."""
    _fit(_fit_config(tmp_path, "ddp", devices=2, strategy="ddp", num_nodes=1), timeout=500)
    _fit(_fit_config(tmp_path, "mesh", latent=2, devices=4), timeout=500)
    want, got = _whole_state(tmp_path / "ddp" / "last.ckpt"), _whole_state(tmp_path / "mesh" / "last.ckpt")
    assert torch.load(tmp_path / "mesh" / "last.ckpt", weights_only=True)["latent_shards"]["size"] == 2
    for key, value in want.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[key], value, rtol=0, atol=_fit_tolerance(value), msg=key)
        else:
            assert torch.equal(got[key], value), key


@pytest.mark.slow
def test_sigkill_of_a_latent_parallel_run_then_resume_is_bitwise_equal(tmp_path):
    whole = _fit_config(tmp_path, "whole", latent=2)
    _fit(whole)
    held = _fit_config(tmp_path, "parts", latent=2)
    config = yaml.safe_load(held.read_text())
    config["trainer"]["callbacks"] = [{"class_path": "tests.announce.Announce",
                                       "init_args": {"marker": str(tmp_path / "parts.reached"),
                                                     "event": "train_batch_start", "step": 5}}]
    held = held.with_name("parts-announce.yaml")
    held.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "saelightning", "fit", "--config", str(held)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert wait_for(proc, tmp_path / "parts.reached") == 5
    os.killpg(proc.pid, signal.SIGKILL)  # every rank at once
    proc.communicate(timeout=60)
    assert torch.load(tmp_path / "parts" / "last.ckpt", weights_only=True)["global_step"] == 4
    _fit(_fit_config(tmp_path, "parts", latent=2), "--ckpt_path", "last")
    a, b = _whole_state(tmp_path / "whole" / "last.ckpt"), _whole_state(tmp_path / "parts" / "last.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    wa = torch.load(tmp_path / "whole" / f"last.ckpt.step{FIT_STEPS}.shard1of2", weights_only=True)
    wb = torch.load(tmp_path / "parts" / f"last.ckpt.step{FIT_STEPS}.shard1of2", weights_only=True)
    for index, moments in wa["optimizer_state"].items():  # the shards' Adam moments too
        for key, value in moments.items():
            assert torch.equal(value, wb["optimizer_state"][index][key]), (index, key)


@pytest.mark.slow
def test_resampling_under_two_latent_shards_equals_resampling_in_one_process(tmp_path):
    """Dead latents resampled every 2 steps: the sharded fit rewrites the latents the one-process fit does (the same
    picks from the same batch), so the two runs stay equal within the fit's tolerance."""
    runs = {}
    for run, latent in (("one", None), ("two", 2)):
        # wide and k = 1: most latents die within a window of one step
        saes = [{**spec, "d_sae": 96, "k": 1} if "k" in spec else spec for spec in FIT_SAES]
        cfg = _fit_config(tmp_path, run, latent=latent, saes=saes)
        config = yaml.safe_load(cfg.read_text())
        config["model"]["dead_window_tokens"] = 64
        config["resample"] = {"every_n_steps": 2, "until_step": FIT_STEPS, "seed": 0}
        cfg.write_text(yaml.safe_dump(config))
        if latent is None:
            assert main(["fit", "--config", str(cfg)]) == 0
        else:
            _fit(cfg)
        ckpt = tmp_path / run / "last.ckpt"
        runs[run] = (_whole_state(ckpt),
                     torch.load(ckpt, weights_only=True)["callbacks"]["ResampleDeadLatents"]["history"])
    (want, want_history), (got, got_history) = runs["one"], runs["two"]
    assert got_history == want_history and any(h["resampled"] for h in want_history), want_history
    for key, value in want.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[key], value, rtol=0, atol=_fit_tolerance(value), msg=key)
        else:
            assert torch.equal(got[key], value), key


def test_latent_parallel_size_must_be_a_positive_integer():
    strategy = LatentParallelStrategy(latent_parallel_size=2)
    with pytest.raises(SAELightningError, match="positive integer"):
        LatentParallelStrategy(latent_parallel_size=0)
    assert strategy.latent_parallel_size == 2


# --- start-up memory: each rank draws only its shard, the same numbers as those rows of the whole init ---

@pytest.mark.parametrize("rows, cols", [(64, 16), (64, 12), (24, 12), (100, 37), (33, 1), (7, 3), (3, 5), (90, 7)])
def test_normal_rows_are_the_rows_of_one_draw_and_leave_the_generator_where_it_does(rows, cols):
    for parts in (1, 2, 3):
        size = rows // parts
        for part in range(parts):
            torch.manual_seed(5)
            whole, after = torch.randn(rows, cols), torch.randn(3)
            torch.manual_seed(5)
            # chunks of a few rows: many draws, a last one merged when it would be under 16 values
            got = normal_rows(rows, cols, part * size, size, chunk=48)
            assert torch.equal(got, whole[part * size:(part + 1) * size]), (rows, cols, parts, part)
            assert torch.equal(torch.randn(3), after)


def _slice(key: str, whole: torch.Tensor, shard: LatentShard) -> torch.Tensor:
    axis = LATENT_AXES.get(key)
    if axis is None or whole.dim() <= axis:
        return whole
    return whole.narrow(axis, shard.offset, shard.d_local)


@pytest.mark.parametrize("case", list(CASES))
def test_a_shard_drawn_alone_equals_those_rows_of_the_whole_init(case):
    config = _build(case).config
    for size in (2, 4):
        for rank in range(size):
            torch.manual_seed(0)
            whole, after = build_sae(config).state_dict(), torch.randn(3)
            torch.manual_seed(0)
            shard = LatentShard(None, rank, size, D_SAE)
            part = build_sae(config, shard)
            assert torch.equal(torch.randn(3), after)  # the next SAE of a sweep draws what it drew before
            assert part.shard is shard and part.W_enc.shape == (D_IN, D_SAE // size)
            got = part.state_dict()
            assert got.keys() == whole.keys()
            for key, value in whole.items():
                assert torch.equal(got[key], _slice(key, value, shard)), (case, size, rank, key)


def test_a_gated_shard_is_refused_at_construction():
    with pytest.raises(SAELightningError, match="shard_latents: false"):
        build_sae(SAEConfig(architecture="gated", d_in=D_IN, d_sae=D_SAE), LatentShard(None, 0, 2, D_SAE))


@pytest.mark.parametrize("architecture", ["crosscoder", "crosscoder_l1"])
def test_a_crosscoder_is_refused_sharding_and_builds_whole(architecture):
    config = SAEConfig(architecture=architecture, d_in=2 * D_IN, d_sae=D_SAE, n_models=2)
    assert build_sae(config).W_dec.shape == (D_SAE, 2 * D_IN)  # the shard argument every class takes, left None
    with pytest.raises(SAELightningError, match="crosscoder.*shard_latents: false"):
        build_sae(config, LatentShard(None, 0, 2, D_SAE))
    with pytest.raises(SAELightningError, match="shard_latents: false"):
        build_sae(config).shard_latents(LatentShard(None, 0, 2, D_SAE))


def test_a_transcoder_is_refused_sharding_and_builds_whole():
    config = SAEConfig(architecture="topk", d_in=D_IN, d_sae=D_SAE, d_out=D_IN // 2, k=4, skip_connection=True)
    assert build_sae(config).W_dec.shape == (D_SAE, D_IN // 2)
    with pytest.raises(SAELightningError, match="transcoder has no latent-sharded form.*shard_latents: false"):
        build_sae(config, LatentShard(None, 0, 2, D_SAE))
    with pytest.raises(SAELightningError, match="transcoder has no latent-sharded form.*shard_latents: false"):
        build_sae(config).shard_latents(LatentShard(None, 0, 2, D_SAE))


def test_a_cross_layer_transcoder_is_refused_sharding_under_the_strategy():
    spec = {"hook_name": "blocks.0.hook_mlp_in", "hook_name_out": "blocks.1.hook_mlp_out", "cross_layer": True,
            "architecture": "topk", "d_sae": 32, "k": 4, "name": "clt"}
    module = SAEModule(saes=[spec], n_layer=2, d_model=16)
    module._trainer = type("Trainer", (), {"strategy": _LatentRank(0, 2)})()
    with pytest.raises(SAELightningError, match="cross-layer transcoder has no latent-sharded form.*shard_latents"):
        module.configure_model()
    module = SAEModule(saes=[{**spec, "shard_latents": False}], n_layer=2, d_model=16)
    module._trainer = type("Trainer", (), {"strategy": _LatentRank(0, 2)})()
    module.configure_model()  # held whole by every rank of the latent group
    assert module.saes["clt"].encoders[0].W_enc.shape == (16, 32) and module.sharded == []


class _LatentRank:
    """The two things configure_model reads of a LatentParallelStrategy: its size and this rank's shard."""

    def __init__(self, rank, size):
        self.rank, self.latent_parallel_size = rank, size

    def latent_shard(self, d_sae):
        return LatentShard(None, self.rank, self.latent_parallel_size, d_sae)


def test_a_deferred_module_draws_in_configure_model_what_an_undeferred_one_draws_in_init():
    specs = [{"hook_name": "blocks.0.hook_resid_post", "architecture": "topk", "d_sae": 64, "k": 4, "name": "a"},
             {"hook_name": "blocks.0.hook_resid_post", "architecture": "relu", "d_sae": 32, "name": "b",
              "shard_latents": False},
             {"hook_name": "blocks.0.hook_resid_post", "architecture": "jumprelu", "d_sae": 48, "name": "c"},
             # transcoders are held whole: drawn late as built in __init__, their output hook kept
             {"hook_name": "blocks.1.hook_mlp_in", "hook_name_out": "blocks.1.hook_mlp_out", "architecture": "topk",
              "d_sae": 32, "k": 4, "skip_connection": True, "name": "t", "shard_latents": False},
             {"hook_name": "blocks.0.hook_mlp_in", "hook_name_out": "blocks.1.hook_mlp_out", "cross_layer": True,
              "architecture": "relu", "d_sae": 16, "name": "clt", "shard_latents": False}]
    whole = ("b", "t", "clt")
    specs_d_sae = {s["name"]: s["d_sae"] for s in specs}
    torch.manual_seed(0)
    want, after = SAEModule(saes=specs, n_layer=2, d_model=16).state_dict(), torch.randn(3)
    for rank in (None, 0, 1):
        torch.manual_seed(0)
        with deferred_sae_init():
            module = SAEModule(saes=specs, n_layer=2, d_model=16)
        assert module.saes["a"].W_enc.is_meta  # nothing drawn yet
        module._trainer = None if rank is None else type("Trainer", (), {"strategy": _LatentRank(rank, 2)})()
        module.configure_model()
        assert torch.equal(torch.randn(3), after)
        got = module.state_dict()
        assert got.keys() == want.keys()
        for key, value in want.items():
            part, name = key.split(".")[:2] if "." in key else (key, None)
            if rank is not None and part == "saes" and name not in whole:  # this rank's latents of a sharded SAE
                expect = _slice(key.rsplit(".", 1)[-1], value, LatentShard(None, rank, 2, specs_d_sae[name]))
            elif rank is not None and part == "states" and name not in whole and value.dim() == 1:
                expect = value[:value.shape[0] // 2]  # its fresh trackers (constant: any half)
            else:
                expect = value
            assert got[key].shape == expect.shape and torch.equal(got[key].nan_to_num(), expect.nan_to_num()), key
        assert module.saes["t"].metadata["hook_name_out"] == "blocks.1.hook_mlp_out"
        assert module.saes["clt"].metadata["hook_names_in"] == ["blocks.0.hook_mlp_in", "blocks.1.hook_mlp_in"]
