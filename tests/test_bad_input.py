"""Bad input through the real CLI: one line on stderr, exit code 2, no traceback, nothing half-written.

Each case breaks one thing in a copy of the fixture model/data/SAE and runs one subcommand
(fit, eval, viz, generate, cache, export) in-process through saelightning.cli.main.
"""

import logging
import os
import pickle
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from saelightning.cli import main
from saelightning.errors import SAELightningError
from saelightning.export import save_sae
from saelightning.saes import SAEConfig, build_sae
from tests.test_train import HOOK, _config


@pytest.fixture(autouse=True)
def _lightning_logs_to_captured_stderr(capsys):
    """Lightning's log handler keeps the stderr of the test that imported it; point it at this test's."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(sys.stderr)


def _fails(capsys, argv: list[str]) -> str:
    """Run the CLI; assert exit 2, exactly one stderr line, no traceback; return that line."""
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("saelightning: error: "), err
    return lines[0]


def _ckpt_dir(base: Path) -> Path:
    return base / "base_checkpoints" / "d2"


@pytest.fixture
def model_copy(tmp_path, nanochat_current_dir):
    """A writable copy of the fixture base dir (base_checkpoints/d2/ + tokenizer/)."""
    return Path(shutil.copytree(nanochat_current_dir, tmp_path / "model"))


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    """An exported TopK SAE for the fixture model's blocks.1.hook_resid_post (d_in 64)."""
    out = tmp_path_factory.mktemp("sae") / "sae"
    sae = build_sae(SAEConfig(architecture="topk", d_in=64, d_sae=128, k=8))
    return save_sae(sae, out, metadata={"hook_name": HOOK, "context_size": 32})


def _fit(tmp_path, model, data, edit=None, run="run") -> list[str]:
    path = _config(tmp_path, model, data, run=run)
    config = yaml.safe_load(path.read_text())
    if edit:
        edit(config)
    path.write_text(yaml.safe_dump(config))
    return ["fit", "--config", str(path)]


def _nothing_written(run_dir: Path) -> None:
    assert not list(run_dir.rglob("*.ckpt")) and not (run_dir / "saes").exists()


# --- the nanochat model ---

def _break_model(kind: str, base: Path) -> Path:
    """Break the copied model in one way; returns the path to pass as the model."""
    ckpt = _ckpt_dir(base)
    (model_file,) = ckpt.glob("model_*.pt")
    if kind == "missing dir":
        return base / "no_such_dir"
    if kind == "empty dir":
        (base / "empty").mkdir()
        return base / "empty"
    if kind == "no model_*.pt":
        model_file.unlink()
        return ckpt
    if kind == "corrupt model file":
        model_file.write_bytes(b"this is not a torch file" * 100)
        return ckpt
    if kind == "truncated model file":
        data = model_file.read_bytes()
        model_file.write_bytes(data[: len(data) // 2])
        return ckpt
    if kind == "meta without model_config":
        (meta,) = ckpt.glob("meta_*.json")
        meta.write_text('{"step": 10, "val_bpb": 1.5}')
        return ckpt
    if kind == "missing tokenizer":
        shutil.rmtree(base / "tokenizer")
        return base
    if kind == "malicious tokenizer.pkl":
        class Exploit:
            def __reduce__(self):
                return (os.system, ("touch " + str(base / "pwned"),))
        (base / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(Exploit()))
        return base
    raise ValueError(kind)


MODEL_CASES = {
    "missing dir": "does not exist",
    "empty dir": "model_",
    "no model_*.pt": "no model_",
    "corrupt model file": "model_000010.pt",
    "truncated model file": "model_000010.pt",
    "meta without model_config": "model_config",
    "missing tokenizer": "tokenizer",
    "malicious tokenizer.pkl": "tokenizer.pkl",
}


@pytest.mark.parametrize("kind", MODEL_CASES)
def test_bad_model_fit(kind, tmp_path, model_copy, tiny_shards_dir, capsys):
    model = _break_model(kind, model_copy)
    line = _fails(capsys, _fit(tmp_path, model, tiny_shards_dir))
    assert MODEL_CASES[kind] in line, line
    _nothing_written(tmp_path / "run")
    assert not (model_copy / "pwned").exists()  # the pickle's payload never ran


@pytest.mark.parametrize("kind", ["corrupt model file", "meta without model_config", "malicious tokenizer.pkl"])
def test_bad_model_other_commands(kind, tmp_path, model_copy, tiny_shards_dir, sae_dir, capsys):
    model = str(_break_model(kind, model_copy))
    out = tmp_path / "out"
    for argv in (["eval", "--sae", str(sae_dir), "--model", model, "--data", str(tiny_shards_dir), "--tokens", "256",
                  "--out", str(out / "eval.json"), "--device", "cpu"],
                 ["viz", "--sae", str(sae_dir), "--model", model, "--data", str(tiny_shards_dir), "--tokens", "256",
                  "--out", str(out / "viz"), "--device", "cpu"],
                 ["generate", "--model", model, "--prompt", "def f", "--max-tokens", "2", "--device", "cpu"],
                 ["cache", "--model", model, "--hooks", HOOK, "--tokens", "256", "--data", str(tiny_shards_dir),
                  "--out", str(out / "cache")]):
        assert MODEL_CASES[kind] in _fails(capsys, argv), argv[0]
    assert not out.exists()
    assert not (model_copy / "pwned").exists()


def test_unknown_era(tmp_path, nanochat_current_dir, tiny_shards_dir, capsys):
    line = _fails(capsys, _fit(tmp_path, nanochat_current_dir, tiny_shards_dir,
                               edit=lambda c: c["data"].update(era="medieval")))
    assert "medieval" in line and "original" in line and "current" in line
    # the wrong era for these weights is named too
    line = _fails(capsys, _fit(tmp_path, nanochat_current_dir, tiny_shards_dir,
                               edit=lambda c: c["data"].update(era="original")))
    assert "original" in line
    _nothing_written(tmp_path / "run")


# --- the text data ---

def test_empty_data_dir(tmp_path, nanochat_current_dir, capsys):
    (tmp_path / "data").mkdir()
    line = _fails(capsys, _fit(tmp_path, nanochat_current_dir, tmp_path / "data"))
    assert "parquet" in line
    _nothing_written(tmp_path / "run")


def test_parquet_without_text_column(tmp_path, nanochat_current_dir, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"content": [f"doc {j}" for j in range(20)]}), data / f"shard_{i:05d}.parquet")
    line = _fails(capsys, _fit(tmp_path, nanochat_current_dir, data))
    assert "text" in line
    _nothing_written(tmp_path / "run")
    line = _fails(capsys, ["cache", "--model", str(nanochat_current_dir), "--hooks", HOOK, "--tokens", "256",
                           "--data", str(data), "--out", str(tmp_path / "cache")])
    assert "text" in line and not (tmp_path / "cache").exists()


# --- the SAE config ---

@pytest.mark.parametrize("sae, expected", [
    ({"hook_name": "blocks.1.hook_resid_psot", "d_sae": 128, "k": 8}, "valid names"),
    ({"hook_name": "blocks.7.hook_resid_post", "d_sae": 128, "k": 8}, "layer"),
    ({"hook_name": HOOK, "d_sae": 128, "k": 128}, "k"),
    ({"hook_name": HOOK, "d_sae": 128, "k": 8, "options": {"l1_coefficent": 1.0}}, "l1_coefficent"),
])
def test_bad_sae_spec(sae, expected, tmp_path, nanochat_current_dir, tiny_shards_dir, capsys):
    line = _fails(capsys, _fit(tmp_path, nanochat_current_dir, tiny_shards_dir,
                               edit=lambda c: c["model"].update(saes=[sae])))
    assert expected in line, line
    _nothing_written(tmp_path / "run")


def _sae_commands(sae, model, shards, tmp_path, neuronpedia: bool) -> list[list[str]]:
    """eval, viz, generate (and neuronpedia) on one SAE directory, writing under tmp_path."""
    data = ["--model", str(model), "--data", str(shards), "--tokens", "256", "--device", "cpu"]
    commands = [["eval", "--sae", str(sae), *data, "--out", str(tmp_path / "eval.json")],
                ["viz", "--sae", str(sae), *data, "--out", str(tmp_path / "viz")],
                ["generate", "--model", str(model), "--sae", str(sae), "--prompt", "def f", "--max-tokens", "2",
                 "--device", "cpu"]]
    if neuronpedia:
        commands.append(["neuronpedia", "--sae", str(sae), *data, "--out", str(tmp_path / "np")])
    return commands


def test_sae_width_not_matching_hook(tmp_path, nanochat_current_dir, tiny_shards_dir, capsys):
    sae = build_sae(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4))
    narrow = save_sae(sae, tmp_path / "narrow", metadata={"hook_name": HOOK, "context_size": 32})
    for argv in _sae_commands(narrow, nanochat_current_dir, tiny_shards_dir, tmp_path, neuronpedia=False):
        line = _fails(capsys, argv)
        assert "32" in line and "64" in line, (argv[0], line)
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "viz").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_sae_weights(damage, tmp_path, nanochat_current_dir, tiny_shards_dir, sae_dir, capsys):
    bad = Path(shutil.copytree(sae_dir, tmp_path / "bad_sae"))
    weights = bad / "sae_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x00garbage" * 50 if damage == "garbage" else data[: len(data) // 2])
    for argv in _sae_commands(bad, nanochat_current_dir, tiny_shards_dir, tmp_path, neuronpedia=True):
        assert "sae_weights.safetensors" in _fails(capsys, argv), argv[0]
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "viz").exists() and not (tmp_path / "np").exists()


def test_buffer_over_the_memory_bound(tmp_path, nanochat_current_dir, tiny_shards_dir, capsys):
    # 256 buffer tokens + one forward of 4 x 32, width 64, fp32, twice: 196608 bytes at the peak
    line = _fails(capsys, _fit(tmp_path, nanochat_current_dir, tiny_shards_dir,
                               edit=lambda c: c["data"].update(max_buffer_bytes=150_000)))
    assert "shuffle buffer" in line and "data.buffer_tokens" in line and "data.max_buffer_bytes" in line
    _nothing_written(tmp_path / "run")
    from saelightning.data import ActivationDataModule

    dm = ActivationDataModule(model=str(nanochat_current_dir), data_dir=str(tiny_shards_dir), context_size=32,
                              batch_size=64, model_batch_rows=4, buffer_tokens=256, max_buffer_bytes=196_608)
    assert dm.buffer_peak_bytes([HOOK]) == 196_608
    dm.check_memory([HOOK])  # exactly at the bound: allowed
    dm.max_buffer_bytes = None  # default: half of this machine's memory
    dm.buffer_tokens = 2**50
    with pytest.raises(SAELightningError, match="limit"):
        dm.check_memory([HOOK])


# --- outputs ---

def test_unwritable_output_dir(tmp_path, nanochat_current_dir, tiny_shards_dir, sae_dir, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = blocker / "out"  # cannot be created whoever runs the test (root ignores permission bits)
    line = _fails(capsys, _fit(tmp_path, nanochat_current_dir, tiny_shards_dir,
                               edit=lambda c: c["trainer"].update(default_root_dir=str(out))))
    assert str(blocker) in line
    model = str(nanochat_current_dir)
    for argv in (["eval", "--sae", str(sae_dir), "--model", model, "--data", str(tiny_shards_dir), "--tokens", "256",
                  "--out", str(out / "eval.json"), "--device", "cpu"],
                 ["viz", "--sae", str(sae_dir), "--model", model, "--data", str(tiny_shards_dir), "--tokens", "256",
                  "--out", str(out / "viz"), "--device", "cpu"],
                 ["cache", "--model", model, "--hooks", HOOK, "--tokens", "256", "--data", str(tiny_shards_dir),
                  "--out", str(out / "cache")]):
        assert str(blocker) in _fails(capsys, argv), argv[0]
    assert blocker.read_text() == "not a directory"


def test_export_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"garbage")
    assert "bad.ckpt" in _fails(capsys, ["export", "--ckpt", str(bad), "--out", str(tmp_path / "out")])
    assert "no checkpoint" in _fails(capsys, ["export", "--ckpt", str(tmp_path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_config_typos_and_bad_values(tmp_path, nanochat_current_dir, tiny_shards_dir, capsys):
    argv = _fit(tmp_path, nanochat_current_dir, tiny_shards_dir, edit=lambda c: c["data"].update(bach_size=3))
    assert "bach_size" in _fails(capsys, argv) and "--help" in _fails(capsys, argv)
    assert "max_stepz" in _fails(capsys, [*argv, "--trainer.max_stepz", "3"])
    assert "abc" in _fails(capsys, [*argv, "--data.batch_size", "abc"])
    assert "nothing.yaml" in _fails(capsys, ["fit", "--config", str(tmp_path / "nothing.yaml")])
    _nothing_written(tmp_path / "run")


def test_non_finite_sae_is_never_exported(tmp_path, capsys):
    """The export callback's save_sae refuses NaN weights with a one-line message naming the SAE, writing nothing."""
    from saelightning.callbacks import export_module
    from saelightning.errors import SAELightningError
    from saelightning.module import SAEModule

    module = SAEModule(saes=[{"hook_name": HOOK, "d_sae": 128, "k": 8, "name": "nan_sae"}], n_layer=2, d_model=64)
    with torch.no_grad():
        module.saes["nan_sae"].W_dec[3, 5] = float("nan")
    with pytest.raises(SAELightningError) as info:
        export_module(module, tmp_path / "saes", step=7)
    assert "nan_sae" in str(info.value) and "NaN" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "saes" / "nan_sae").exists()
    assert not [p for p in (tmp_path / "saes").rglob("*") if p.is_file()] if (tmp_path / "saes").exists() else True
