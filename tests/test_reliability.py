"""Nothing hangs, nothing is lost: Ctrl-C at every stage, errors after the workers started, a full disk,
corrupt checkpoints, empty inputs, runs that would overwrite each other.

Real `saelightning` processes, real signals (to the whole process group, as a terminal's Ctrl-C sends
them), real files. A run announces the point a test wants (tests/announce.py) and holds there until the
signal arrives, so nothing races the machine's speed; every wait is bounded.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from saelightning.cli import main
from saelightning.nanochat.shards import TextStream, list_shards
from tests.announce import wait_for
from tests.test_faults import ROOT, _assert_same_weights, _cfg, _spawn, _step
from tests.test_train import HOOK

BOUND = 60  # seconds any run here may take to end after its signal or error (a hang fails, it does not stall CI)


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, nanochat_current_dir, tiny_shards_dir):
    """The uninterrupted fit every interrupted one must match bitwise."""
    tmp = tmp_path_factory.mktemp("whole")
    assert main(["fit", "--config", str(_cfg(tmp, nanochat_current_dir, tiny_shards_dir, "whole"))]) == 0
    return tmp / "whole" / "last.ckpt"


def _interrupt(proc, sig=signal.SIGINT) -> tuple[str, str]:
    os.killpg(proc.pid, sig)  # the whole group: the main process and its DataLoader worker, as Ctrl-C does
    try:
        out, err = proc.communicate(timeout=BOUND)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the run did not end within {BOUND} s of its signal")
    return out, err


def _no_orphans(marker: str) -> None:
    """No process of the run (its DataLoader workers carry its command line) outlives it."""
    deadline = time.monotonic() + 10
    while True:
        alive = []
        for pid in os.listdir("/proc"):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline and int(pid) != os.getpid():
                alive.append(pid)
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not alive, f"processes left behind: {alive}"


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("saelightning: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# --- Ctrl-C ---

@pytest.mark.parametrize("event,step,saved", [
    ("train_batch_end", 3, 3),   # mid-training: that step is saved
    ("validation_start", 5, 6),  # as validation starts (after step 5): the partial validation is dropped, step 6 saved
    ("save_checkpoint", 2, 3),   # during a checkpoint (step 2's): it completes, then step 3 is saved
], ids=["mid-training", "validation", "checkpoint"])
def test_ctrl_c_saves_last_and_the_resume_is_bitwise_equal(tmp_path, nanochat_current_dir, tiny_shards_dir, whole_run,
                                                           event, step, saved):
    cfg = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "parts")
    held = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "parts", {"event": event, "step": step})
    proc = _spawn(held, "--trainer.max_steps", "1000", start_new_session=True)
    wait_for(proc, tmp_path / "parts.reached")
    out, err = _interrupt(proc)
    assert proc.returncode == 0, err[-3000:]
    assert f"SIGINT at step {saved}: saved" in out + err
    assert "KeyboardInterrupt" not in out + err
    assert _step(tmp_path / "parts" / "last.ckpt") == saved
    assert (tmp_path / "parts" / "saes").is_dir()
    _no_orphans(str(held))
    assert main(["fit", "--config", str(cfg), "--ckpt_path", "last"]) == 0
    _assert_same_weights(whole_run, tmp_path / "parts" / "last.ckpt")


@pytest.mark.parametrize("normalize,where", [(True, "the scale estimate"),
                                             (False, "the first fill of the shuffle buffer")])
def test_ctrl_c_before_the_first_step_stops_at_once_and_leaves_nothing(tmp_path, nanochat_current_dir, tiny_shards_dir,
                                                                      normalize, where):
    held = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "early", {"event": "fit_start"})
    config = yaml.safe_load(held.read_text())
    config["data"]["normalize"] = normalize  # without a scale to estimate, the buffer fill is the first work
    held.write_text(yaml.safe_dump(config))
    proc = _spawn(held, start_new_session=True)
    wait_for(proc, tmp_path / "early.reached")
    out, err = _interrupt(proc)
    assert proc.returncode == 130, err[-3000:]
    assert f"SIGINT during {where}, before the first training step: nothing was trained" in err
    assert "Traceback" not in err
    assert not (tmp_path / "early").exists()  # no checkpoint to keep, no empty log version left behind
    _no_orphans(str(held))


def test_a_second_ctrl_c_stops_without_saving(tmp_path, nanochat_current_dir, tiny_shards_dir):
    held = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "twice", {"event": "validation_start", "step": 5,
                                                                         "hold": 0.0})
    proc = _spawn(held, "--trainer.max_steps", "1000", start_new_session=True)
    wait_for(proc, tmp_path / "twice.reached")
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.01)
    _interrupt(proc)  # the second one, within the same step
    assert proc.returncode != 0
    _no_orphans(str(held))


@pytest.mark.slow
def test_ctrl_c_under_two_process_ddp_saves_every_rank_and_resumes_bitwise(tmp_path, nanochat_current_dir,
                                                                          tiny_shards_dir):
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    whole = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "whole")
    proc = _spawn(whole, *ddp)
    assert proc.wait(timeout=400) == 0, proc.communicate()[1][-3000:]
    parts = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "parts")
    held = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "parts", {"event": "train_batch_end", "step": 3})
    proc = _spawn(held, *ddp, "--trainer.max_steps", "1000", start_new_session=True)
    wait_for(proc, tmp_path / "parts.reached")
    out, err = _interrupt(proc)
    assert proc.returncode == 0, err[-3000:]
    ckpt = torch.load(tmp_path / "parts" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and [p["index"] for p in ckpt["ActivationDataModule"]["positions"]] == [3, 3]
    _no_orphans(str(held))
    proc = _spawn(parts, *ddp, "--ckpt_path", "last")
    assert proc.wait(timeout=400) == 0, proc.communicate()[1][-3000:]
    _assert_same_weights(tmp_path / "whole" / "last.ckpt", tmp_path / "parts" / "last.ckpt")


def test_ctrl_c_during_cache_then_the_same_command_finishes_the_same_cache(tmp_path, nanochat_current_dir,
                                                                           tiny_shards_dir):
    def command(out):
        return [sys.executable, "-m", "saelightning", "cache", "--model", str(nanochat_current_dir), "--hooks", HOOK,
                "--tokens", "30000", "--shard-tokens", "3000", "--data", str(tiny_shards_dir), "--context-size", "32",
                "--out", str(out)]

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    whole = subprocess.run(command(tmp_path / "whole"), env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "cut"
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + BOUND
    while not (out / ".progress.json").exists() or not json.loads((out / ".progress.json").read_text())["chunks"]:
        assert proc.poll() is None and time.monotonic() < deadline, "the cache never wrote its first chunk"
        time.sleep(0.01)
    _, err = _interrupt(proc)
    if proc.returncode == 0:  # it finished between the poll and the signal: nothing to resume, still the same cache
        assert (out / "manifest.json").exists()
    else:
        assert proc.returncode == 130 and "run the same command again to continue" in err, err[-2000:]
        assert not (out / "manifest.json").exists() and "Traceback" not in err
        again = subprocess.run(command(out), env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
    got = json.loads((out / "manifest.json").read_text())
    want = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert [s["sha256"] for s in got["shards"]] == [s["sha256"] for s in want["shards"]]
    assert not list(out.glob(".*"))  # no temporary or progress file left


# --- a process never outlives its own error ---

def _corrupt_a_row_group(shards_dir: Path, out: Path) -> Path:
    """A copy of the shards in which one train row group's data pages are damaged, the footer intact (so the
    shards list fine, the scale estimate reads the first row group in the main process, and only a
    DataLoader worker, reading on, meets the damage)."""
    shutil.copytree(shards_dir, out)
    train, _ = list_shards(out)
    file_index, group = TextStream(train)._unit_order(0)[1]  # the second row group read
    path = train[file_index]
    column = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    for i in range(start + 16, start + column.total_compressed_size):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return out


def test_an_error_in_a_dataloader_worker_exits_2_at_once_with_no_worker_left(tmp_path, nanochat_current_dir,
                                                                             tiny_shards_dir):
    data = _corrupt_a_row_group(tiny_shards_dir, tmp_path / "data")
    cfg = _cfg(tmp_path, nanochat_current_dir, data, "broken", max_steps=200)
    config = yaml.safe_load(cfg.read_text())
    config["data"].update(scale_batches=1, num_workers=2)
    cfg.write_text(yaml.safe_dump(config))
    proc = _spawn(cfg, start_new_session=True)
    out, err = proc.communicate(timeout=BOUND)
    assert proc.returncode == 2, err[-3000:]
    line = _one_error_line(err)
    assert "cannot be read" in line and "re-download or rewrite the shard" in line and "Original Traceback" not in line
    _no_orphans(str(cfg))


def _with_file_size_limit(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so_in_one_line(tmp_path, nanochat_current_dir,
                                                                          tiny_shards_dir):
    cfg = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "full", max_steps=4)
    assert main(["fit", "--config", str(cfg)]) == 0
    last = tmp_path / "full" / "last.ckpt"
    before = last.read_bytes()
    limit = len(before) // 2  # every checkpoint is about this size: the next one cannot be written
    proc = _spawn(cfg, "--ckpt_path", "last", "--trainer.max_steps", "8", "--export.enabled", "false",
                  preexec_fn=_with_file_size_limit(limit))
    out, err = proc.communicate(timeout=BOUND)
    assert proc.returncode == 2, err[-3000:]
    line = _one_error_line(err)
    assert "cannot write" in line and ".ckpt" in line and "GiB free there" in line and "intact" in line
    assert ".tmp" not in line  # the message names the checkpoint, not a temporary file
    assert last.read_bytes() == before  # the previous last.ckpt, bit for bit
    assert not list((tmp_path / "full").glob(".*.tmp"))
    _no_orphans(str(cfg))


@pytest.mark.parametrize("command", ["viz", "neuronpedia"])
def test_a_full_disk_in_viz_and_neuronpedia_is_one_line_and_writes_nothing(tmp_path, nanochat_current_dir,
                                                                          tiny_shards_dir, command):
    from tests.test_evaluate import export_sae

    sae = export_sae(tmp_path / "sae", "blocks.1.hook_resid_post", 64)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "saelightning", command, "--sae", str(sae), "--model", str(nanochat_current_dir),
            "--data", str(tiny_shards_dir), "--tokens", "300", "--out", str(out), "--device", "cpu"]
    done = subprocess.run(argv, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=BOUND, preexec_fn=_with_file_size_limit(2000))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "cannot write" in _one_error_line(done.stderr)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_inputs_that_yield_no_tokens_are_an_error_not_a_loop(tmp_path, nanochat_current_dir, tiny_shards_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(3):  # documents whose text is empty: every row would be BOS only
        pq.write_table(pa.table({"text": pa.array([""] * 20, type=pa.string())}), empty / f"shard_{i:05d}.parquet",
                       row_group_size=4)
    cfg = _cfg(tmp_path, nanochat_current_dir, empty, "empty")
    proc = _spawn(cfg, start_new_session=True)
    out, err = proc.communicate(timeout=BOUND)
    assert proc.returncode == 2, err[-3000:]
    assert "gave no text" in _one_error_line(err)
    _no_orphans(str(cfg))
    # row groups that hold no rows at all
    rowless = tmp_path / "rowless"
    rowless.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), rowless / f"shard_{i:05d}.parquet")
    with pytest.raises(Exception, match="no row groups|gave no text"):
        next(iter(TextStream(list_shards(rowless)[0])))


# --- checkpoints and exports ---

def test_a_corrupt_last_ckpt_names_the_intact_step_checkpoint_and_creates_nothing(tmp_path, nanochat_current_dir,
                                                                                 tiny_shards_dir, capsys):
    cfg = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "bad", max_steps=5)
    assert main(["fit", "--config", str(cfg)]) == 0
    run = tmp_path / "bad"
    last = run / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])  # truncated, as by a full disk mid-write
    versions = sorted(p.name for p in (run / "lightning_logs").iterdir())
    capsys.readouterr()
    assert main(["fit", "--config", str(cfg), "--ckpt_path", "last", "--trainer.max_steps", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last.ckpt" in err[0] and "truncated or corrupt" in err[0]
    assert "--ckpt_path" in err[0] and "step=4.ckpt" in err[0]  # the intact step checkpoint beside it
    assert sorted(p.name for p in (run / "lightning_logs").iterdir()) == versions  # no empty version opened
    step4 = next(run.glob("*step=4.ckpt"))
    assert main(["fit", "--config", str(cfg), "--ckpt_path", str(step4), "--trainer.max_steps", "8"]) == 0


def test_the_export_carries_the_metrics_of_its_weights(tmp_path, nanochat_current_dir, tiny_shards_dir):
    cfg = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "metrics", max_steps=10)  # saves at 2..10, val at 5, 10
    assert main(["fit", "--config", str(cfg)]) == 0
    run = tmp_path / "metrics"
    (exported,) = (run / "saes").iterdir()
    final = json.loads((exported / "cfg.json").read_text())["metadata"]
    assert final["training_steps"] == 10 and final["final_metrics_step"] == 10
    # last.ckpt was saved again after the final validation: exporting it gives the run's final figures
    assert main(["export", "--ckpt", str(run / "last.ckpt"), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / exported.name / "cfg.json").read_text())["metadata"]
    assert again["final_metrics_step"] == 10
    assert again["final_metrics"]["val/explained_variance"] == final["final_metrics"]["val/explained_variance"]
    # a step checkpoint is saved before its step's validation: its export says which step its figures are from
    assert main(["export", "--ckpt", str(next(run.glob("*step=10.ckpt"))), "--out", str(tmp_path / "step")]) == 0
    step = json.loads((tmp_path / "step" / exported.name / "cfg.json").read_text())["metadata"]
    assert step["training_steps"] == 10 and step["final_metrics_step"] == 5


def test_resuming_a_finished_run_says_so_and_writes_nothing(tmp_path, nanochat_current_dir, tiny_shards_dir, capsys):
    cfg = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "done", max_steps=4)
    assert main(["fit", "--config", str(cfg)]) == 0
    run = tmp_path / "done"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["fit", "--config", str(cfg), "--ckpt_path", "last"]) == 0
    out = capsys.readouterr().out
    assert "is at step 4, and trainer.max_steps is 4: nothing to train" in out and "exported SAEs" not in out
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_runs_never_mix_in_one_dir(tmp_path, nanochat_current_dir, tiny_shards_dir, capsys):
    cfg = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "first", max_steps=4)
    assert main(["fit", "--config", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["fit", "--config", str(cfg), "--model.saes.0.k", "4"]) == 2  # another run into the same dir
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "--ckpt_path last" in err[0] and "--run_name" in err[0]
    assert not list((tmp_path / "first").glob("last-v*.ckpt"))
    assert main(["fit", "--config", str(cfg), "--model.saes.0.k", "4", "--run_name", "second"]) == 0
    assert (tmp_path / "second" / "last.ckpt").is_file()
    k = json.loads(next((tmp_path / "second" / "saes").iterdir()).joinpath("cfg.json").read_text())["k"]
    assert k == 4  # --model.saes.0.k reached the SAE


def test_a_failed_fit_leaves_no_run_dir(tmp_path, nanochat_current_dir, tiny_shards_dir, capsys):
    bad = tmp_path / "data"
    shutil.copytree(tiny_shards_dir, bad)
    list_shards(bad)[1].write_text("junk")  # the val shard is not parquet
    cfg = _cfg(tmp_path, nanochat_current_dir, bad, "failed")
    assert main(["fit", "--config", str(cfg)]) == 2
    assert "is not a readable parquet file" in capsys.readouterr().err
    assert not (tmp_path / "failed").exists()


# --- bad values get one line ---

def test_bad_config_values_and_yaml_are_one_short_line(tmp_path, nanochat_current_dir, tiny_shards_dir, capsys):
    cfg = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "values")
    config = yaml.safe_load(cfg.read_text())
    config["model"]["saes"][0]["k"] = "sixteen"
    cfg.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["fit", "--config", str(cfg)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "model.saes.k" in line and "sixteen" in line and cfg.name in line and len(line) < 300
    tabbed = tmp_path / "tab.yaml"
    tabbed.write_text("trainer:\n\tmax_steps: 3\n")
    assert main(["fit", "--config", str(tabbed)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "tab.yaml line 2" in line and "tab character" in line and "spaces" in line
    assert not (tmp_path / "values").exists()


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_logger_without_its_package_is_one_line_with_the_pip_command(tmp_path, nanochat_current_dir, tiny_shards_dir,
                                                                        capsys):
    cfg = _cfg(tmp_path, nanochat_current_dir, tiny_shards_dir, "wandb")
    capsys.readouterr()
    assert main(["fit", "--config", str(cfg), "--trainer.logger", "WandbLogger"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "WandbLogger" in line and "pip install" in line and "wandb" in line


@pytest.mark.parametrize("bad,expected", [
    (["--steer", "7:nan"], "must be a finite number"),
    (["--temperature", "-1"], "temperature -1.0 must be a finite number >= 0"),
    (["--top-k", "0"], "top_k 0 must be >= 1"),
    (["--max-tokens", "0"], "--max_tokens must be >= 1"),
])
def test_generate_refuses_bad_values(tmp_path, nanochat_current_dir, capsys, bad, expected):
    from tests.test_evaluate import export_sae

    sae = export_sae(tmp_path / "sae", "blocks.1.hook_resid_post", 64)
    capsys.readouterr()
    argv = ["generate", "--model", str(nanochat_current_dir), "--sae", str(sae), "--prompt", "def ", "--device", "cpu"]
    assert main(argv + bad) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert expected in line
