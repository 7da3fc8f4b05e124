"""Faults: kill -9 and resume, SIGTERM/SIGUSR1 preemption, planted NaN/inf, DDP and torchrun on CPU.

Real `saelightning fit` processes on the tiny fixture model; resumed runs are compared bitwise with an
uninterrupted one. The two-process (gloo) variants are marked slow.
"""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from saelightning import data as data_module
from saelightning.cli import main
from tests.announce import wait_for
from tests.test_train import HOOK, _config, _weights

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8  # the uninterrupted run's length; interrupted runs are stopped well before it


def _cfg(tmp_path, model, shards, run, announce: dict | None = None, name: str | None = None, **trainer):
    """The fault tests' fit config; `announce` adds an Announce callback (tests/announce.py) that makes the run
    say when it reached a point and hold there until it gets a signal."""
    path = _config(tmp_path, model, shards, run=run, **{"max_steps": STEPS, **trainer})
    config = yaml.safe_load(path.read_text())
    config["checkpoint"]["every_n_train_steps"] = 2
    config["model"]["dead_window_tokens"] = 192  # windows of 3 steps: an interruption lands inside one
    path.write_text(yaml.safe_dump(config))
    if announce is not None:
        config["trainer"]["callbacks"] = [{"class_path": "tests.announce.Announce",
                                           "init_args": {"marker": str(tmp_path / f"{run}.reached"), **announce}}]
        path = path.with_name(name or f"{run}-announce.yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def _spawn(cfg, *extra, env=None, **popen):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "saelightning", "fit", "--config", str(cfg), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _reached(proc, tmp_path, run) -> int:
    return wait_for(proc, tmp_path / f"{run}.reached")


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=True)["global_step"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    density = [v for k, v in wa.items() if k.endswith(".density") and k.startswith("states.")]
    assert density and all(torch.isfinite(d).all() for d in density)  # a window completed (and is compared above)


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, nanochat_current_dir, tiny_shards_dir):
    """The uninterrupted fit every interrupted one must match bitwise."""
    tmp = tmp_path_factory.mktemp("whole")
    assert main(["fit", "--config", str(_cfg(tmp, nanochat_current_dir, tiny_shards_dir, "whole"))]) == 0
    return tmp / "whole" / "last.ckpt"


def test_sigkill_at_a_random_step_then_resume_is_bitwise_equal(tmp_path, nanochat_current_dir, tiny_shards_dir,
                                                               whole_run):
    cfg = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "parts")
    at = random.choice([4, 5, 6, 7])  # the run holds at the start of this step, after the save of step 4 or 6
    proc = _spawn(_cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "parts",
                       {"event": "train_batch_start", "step": at}))
    assert _reached(proc, tmp_path, "parts") == at
    proc.send_signal(signal.SIGKILL)  # no handler, no chance to save anything more
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _step(tmp_path / "parts" / "last.ckpt") == at - at % 2  # the last periodic save
    assert main(["fit", "--config", str(cfg), "--ckpt_path", "last"]) == 0
    assert _step(tmp_path / "parts" / "last.ckpt") == STEPS
    _assert_same_weights(whole_run, tmp_path / "parts" / "last.ckpt")


def test_sigterm_saves_last_and_exits_cleanly_then_resumes_bitwise(tmp_path, nanochat_current_dir, tiny_shards_dir,
                                                                   whole_run):
    cfg = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "parts")
    held = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "parts", {"event": "train_batch_end", "step": 3})
    proc = _spawn(held, "--trainer.max_steps", "1000", start_new_session=True)  # would run far past STEPS
    assert _reached(proc, tmp_path, "parts") == 3
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, DataLoader worker included, as SLURM or Ctrl-C do
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    stopped = _step(tmp_path / "parts" / "last.ckpt")
    assert stopped == 3  # the step the signal came in, between two periodic saves
    assert f"SIGTERM at step {stopped}: saved" in out + err
    assert (tmp_path / "parts" / "saes").is_dir()  # the export was written as at any normal end
    assert main(["fit", "--config", str(cfg), "--ckpt_path", "last"]) == 0
    _assert_same_weights(whole_run, tmp_path / "parts" / "last.ckpt")


@pytest.mark.slow
def test_sigusr1_under_slurm_saves_then_requeues(tmp_path, nanochat_current_dir, tiny_shards_dir):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # a stand-in that records how it was called
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    scontrol.chmod(0o755)
    cfg = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "slurm", {"event": "train_batch_end", "step": 2})
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = _spawn(cfg, "--trainer.max_steps", "1000", env=env)
    _reached(proc, tmp_path, "slurm")
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert _step(tmp_path / "slurm" / "last.ckpt") == 2
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]


# --- non-finite values ---

def _plant(monkeypatch, bad: dict[int, float]):
    """Activations of SAE batch number i get the value bad[i] in one entry (NaN, inf or a huge finite value)."""
    original = data_module.ActivationStream.__iter__

    def planted(self):
        for batch in original(self):
            if batch["index"] in bad:
                acts = {h: a.clone() for h, a in batch["acts"].items()}
                acts[HOOK][1, 2] = bad[batch["index"]]
                batch = {**batch, "acts": acts}
            yield batch

    monkeypatch.setattr(data_module.ActivationStream, "__iter__", planted)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, nanochat_current_dir, tiny_shards_dir, monkeypatch):
    # a NaN activation, an inf activation, and a finite one so large that the loss overflows to inf
    _plant(monkeypatch, {2: float("nan"), 5: float("inf"), 7: 1e30})
    cfg = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "nan", max_steps=9)
    assert main(["fit", "--config", str(cfg)]) == 0
    ckpt = torch.load(tmp_path / "nan" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 9
    assert ckpt["state_dict"]["guard.skipped"].item() == 3
    assert ckpt["state_dict"]["tokens_seen"].item() == (9 - 3) * 64  # skipped batches are not trained on
    assert ckpt["saelightning_metrics"]["details/nonfinite_skipped"] == 3.0  # logged (step 9)
    assert all(torch.isfinite(v).all() for k, v in ckpt["state_dict"].items()
               if v.is_floating_point() and "density" not in k)
    from saelightning.export import load_sae

    (export,) = (tmp_path / "nan" / "saes").iterdir()
    sae = load_sae(export)
    assert all(torch.isfinite(p).all() for p in sae.parameters())


def test_consecutive_non_finite_steps_stop_with_one_line_and_keep_the_last_good_checkpoint(
        tmp_path, nanochat_current_dir, tiny_shards_dir, monkeypatch, capsys):
    _plant(monkeypatch, {i: float("nan") for i in range(5, 100)})
    cfg = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "nan")
    capsys.readouterr()
    assert main(["fit", "--config", str(cfg), "--model.max_nonfinite_steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("saelightning: error: 3 steps in a row had non-finite activations (last at step 7)"), err
    assert not any("Traceback" in line for line in err)
    ckpt = torch.load(tmp_path / "nan" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6  # the last checkpoint before the stop (every 2 steps)
    assert ckpt["state_dict"]["guard.skipped"].item() == 1  # batch 5 (6 and 7 came after the save)
    assert all(torch.isfinite(v).all() for k, v in ckpt["state_dict"].items()
               if v.is_floating_point() and "density" not in k)


# --- two processes (gloo on CPU) ---

@pytest.mark.slow
def test_ddp_sigkill_whole_job_then_resume_is_bitwise_equal(tmp_path, nanochat_current_dir, tiny_shards_dir):
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    whole = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "whole", max_steps=8)
    proc = _spawn(whole, *ddp)
    assert proc.wait(timeout=400) == 0, proc.communicate()[1][-3000:]
    parts = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "parts", max_steps=8)
    at = random.choice([5, 7])
    held = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "parts", {"event": "train_batch_start", "step": at},
                max_steps=8)
    proc = _spawn(held, *ddp, start_new_session=True)
    _reached(proc, tmp_path, "parts")
    os.killpg(proc.pid, signal.SIGKILL)  # both ranks at once, like a node going away
    proc.communicate(timeout=60)
    assert _step(tmp_path / "parts" / "last.ckpt") == at - 1
    proc = _spawn(parts, *ddp, "--ckpt_path", "last")
    assert proc.wait(timeout=400) == 0, proc.communicate()[1][-3000:]
    _assert_same_weights(tmp_path / "whole" / "last.ckpt", tmp_path / "parts" / "last.ckpt")


@pytest.mark.slow
def test_ddp_sigterm_to_rank0_saves_every_rank_position(tmp_path, nanochat_current_dir, tiny_shards_dir):
    cfg = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "ddp", {"event": "train_batch_end", "step": 3})
    proc = _spawn(cfg, "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_steps", "1000")
    _reached(proc, tmp_path, "ddp")
    proc.send_signal(signal.SIGTERM)  # only the launcher process (rank 0): the ranks agree at the next step
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    ckpt = torch.load(tmp_path / "ddp" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert [p["index"] for p in ckpt["ActivationDataModule"]["positions"]] == [ckpt["global_step"]] * 2


@pytest.mark.slow
def test_torchrun_two_processes_matches_lightning_ddp(tmp_path, nanochat_current_dir, tiny_shards_dir):
    """`torchrun --nproc_per_node 2 -m saelightning fit ...` trains exactly what `--trainer.devices 2` does."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    runs = {}
    for run, launcher in (("lightning", [sys.executable, "-m", "saelightning"]),
                          ("torchrun", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                        "--master_port", "29517", "-m", "saelightning"])):
        cfg = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, run, max_steps=6)
        done = subprocess.run([*launcher, "fit", "--config", str(cfg), *ddp], env=env, capture_output=True, text=True,
                              timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[run] = tmp_path / run / "last.ckpt"
    _assert_same_weights(runs["lightning"], runs["torchrun"])


def test_slurm_script_resumes_from_last_ckpt(tmp_path):
    """configs/slurm/fit.sbatch run by bash with a recording `srun`: devices/nodes from SLURM,
    --ckpt_path last on requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "srun.args"}\n')
    (bin_dir / "srun").chmod(0o755)
    run_dir = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"trainer": {"default_root_dir": str(run_dir)}}))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="4")
    script = ROOT / "configs" / "slurm" / "fit.sbatch"
    for _ in range(2):
        done = subprocess.run(["bash", str(script), str(cfg)], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        run_dir.mkdir(exist_ok=True)
        (run_dir / "last.ckpt").write_bytes(b"")  # what the first job leaves when it is preempted
    first, second = (tmp_path / "srun.args").read_text().splitlines()
    assert first.split() == ["saelightning", "fit", "--config", str(cfg), "--trainer.num_nodes", "2",
                             "--trainer.devices", "4", "--trainer.strategy", "ddp"]
    assert second.split() == first.split() + ["--ckpt_path", "last"]
