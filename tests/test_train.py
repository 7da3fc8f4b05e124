"""`saelightning fit|validate` end to end on a tiny real nanochat model (CPU, in-process through cli.main)."""

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from saelightning.cli import main
from tests.fits import ddp_fit, fit_config

HOOK = "blocks.1.hook_resid_post"


def _config(tmp_path, model_dir, shards_dir, run="run", saes=None, **trainer):
    data = {"model": str(model_dir), "data_dir": str(shards_dir), "context_size": 32, "batch_size": 64,
            "model_batch_rows": 4, "buffer_tokens": 256, "num_workers": 1, "val_batches": 2, "scale_batches": 2}
    return fit_config(tmp_path, run, saes or [{"hook_name": HOOK, "d_sae": 128, "k": 8}], data, trainer,
                      export={"enabled": os.environ.get("DEV_NO_EXPORT") is None})


def _weights(ckpt):
    """The module's whole state: SAE weights and buffers, dead tracker, density window and last density."""
    return torch.load(ckpt, weights_only=True)["state_dict"]


def test_fit_end_to_end_writes_checkpoint_logs_and_export(tmp_path, nanochat_current_dir, tiny_shards_dir, capsys):
    cfg = _config(tmp_path, nanochat_current_dir, tiny_shards_dir)
    assert main(["fit", "--config", str(cfg)]) == 0
    run = tmp_path / "run"
    out = capsys.readouterr().out
    assert "exported SAEs" in out and "val/explained_variance" in out
    assert (run / "last.ckpt").is_file()
    assert list(run.glob("lightning_logs/version_0/events.out.tfevents.*"))
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 10
    assert len(ckpt["ActivationDataModule"]["positions"]) == 1
    # the export: SAELens layout, metadata naming the model and hook, weights on raw activations
    from saelightning.export import load_sae

    (export,) = (run / "saes").iterdir()
    cfg_json = json.loads((export / "cfg.json").read_text())
    meta = cfg_json["metadata"]
    assert meta["hook_name"] == HOOK and meta["context_size"] == 32 and meta["training_tokens"] == 10 * 64
    assert meta["model"]["era"] == "current" and meta["model"]["step"] == 10
    assert "val/explained_variance" in meta["final_metrics"]
    # validation splices each SAE into the model: CE/KL scores reach TensorBoard and the export
    final = meta["final_metrics"]
    for key in ("ce_loss_score", "kl_div_score", "ce_loss_with_sae", "ce_loss_without_sae", "ce_loss_with_ablation"):
        assert math.isfinite(final[f"val/{key}"]), key
    assert final["val/kl_div_with_sae"] >= 0 and final["val/kl_div_with_ablation"] > 0
    assert final["val/kl_div_score"] == pytest.approx(
        1 - final["val/kl_div_with_sae"] / final["val/kl_div_with_ablation"], rel=1e-4)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "lightning_logs" / "version_0"), size_guidance={"tensors": 0}).Reload()
    assert {"val/ce_loss_score", "val/kl_div_score"} <= set(events.Tags()["scalars"])
    summary = events.Tensors("sparsity/summary/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "latents alive" in summary and "Most frequent" in summary
    sae = load_sae(export)
    scale = ckpt["ActivationDataModule"]["scales"][HOOK]
    x = torch.randn(16, 64)
    trained = {k.removeprefix(f"saes.{export.name}."): v for k, v in ckpt["state_dict"].items()
               if k.startswith(f"saes.{export.name}.")}
    from saelightning.module import SAESpec, build_from_spec

    scaled = build_from_spec(SAESpec(hook_name=HOOK, d_sae=128, k=8), 64)
    scaled.load_state_dict(trained)
    torch.testing.assert_close(sae.decode(sae.encode(x)), scaled.decode(scaled.encode(x * scale)) / scale,
                               rtol=1e-4, atol=1e-5)
    # `saelightning export` from the checkpoint writes the same weights as the callback did
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "again")]) == 0
    again = load_sae(tmp_path / "again" / export.name)
    for name, p in sae.named_parameters():
        assert torch.equal(p, again.get_parameter(name)), name
    assert json.loads((tmp_path / "again" / export.name / "cfg.json").read_text())["metadata"]["final_metrics"]
    assert main(["export", "--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    # validate from the last checkpoint
    assert main(["validate", "--config", str(cfg), "--ckpt_path", "last"]) == 0


def test_resume_from_last_is_bitwise_equal(tmp_path, nanochat_current_dir, tiny_shards_dir):
    whole = _config(tmp_path, nanochat_current_dir, tiny_shards_dir, run="whole")
    assert main(["fit", "--config", str(whole)]) == 0
    parts = _config(tmp_path, nanochat_current_dir, tiny_shards_dir, run="parts")
    # stopped after step 7 (mid-buffer, after a resampling at step 5), then resumed to the end
    assert main(["fit", "--config", str(parts), "--trainer.max_steps", "7"]) == 0
    assert main(["fit", "--config", str(parts), "--ckpt_path", "last"]) == 0
    a, b = _weights(tmp_path / "whole" / "last.ckpt"), _weights(tmp_path / "parts" / "last.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    resampled = torch.load(tmp_path / "parts" / "last.ckpt", weights_only=True)["callbacks"]["ResampleDeadLatents"]
    assert [h["step"] for h in resampled["history"]] == [5, 10]
    # one run, one TensorBoard curve: the resume continues version_0, and its curve is the uninterrupted run's
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert [p.name for p in (tmp_path / "parts" / "lightning_logs").iterdir()] == ["version_0"]
    curves = [EventAccumulator(str(tmp_path / run / "lightning_logs" / "version_0")).Reload()
              for run in ("whole", "parts")]
    for tag in ("losses/overall_loss", "metrics/explained_variance", "val/explained_variance"):
        whole_curve, parts_curve = ([(e.step, e.value) for e in c.Scalars(tag)] for c in curves)
        assert parts_curve == whole_curve and len(whole_curve) >= 2, tag


def test_sweep_runs_one_model_forward_for_all_saes(tmp_path, nanochat_current_dir, tiny_shards_dir, monkeypatch):
    from saelightning.nanochat.model import GPT

    calls = []
    original = GPT.run_with_cache

    def counted(self, idx, names, *args, **kwargs):
        calls.append(tuple(names))
        return original(self, idx, names, *args, **kwargs)

    monkeypatch.setattr(GPT, "run_with_cache", counted)
    single = _config(tmp_path, nanochat_current_dir, tiny_shards_dir, run="single", max_steps=6)
    assert main(["fit", "--config", str(single)]) == 0
    n_single, calls[:] = len(calls), []
    saes = [{"hook_name": HOOK, "d_sae": 128, "k": 8, "name": "topk"},
            {"hook_name": "blocks.0.mlp.hook_post", "architecture": "relu", "expansion_factor": 0.5,
             "name": "mlp_relu"},
            {"hook_name": HOOK, "architecture": "batchtopk", "d_sae": 64, "k": 4, "name": "btk"}]
    sweep = _config(tmp_path, nanochat_current_dir, tiny_shards_dir, run="sweep", saes=saes, max_steps=6)
    assert main(["fit", "--config", str(sweep)]) == 0
    assert len(calls) == n_single  # the same number of forwards as one SAE
    assert set(calls[0]) == {HOOK, "blocks.0.mlp.hook_post"}
    assert sorted(p.name for p in (tmp_path / "sweep" / "saes").iterdir()) == ["btk", "mlp_relu", "topk"]
    metrics = torch.load(tmp_path / "sweep" / "last.ckpt", weights_only=True)["saelightning_metrics"]
    assert {"topk/val/explained_variance", "mlp_relu/val/l0", "btk/metrics/l0"} <= metrics.keys()


def test_typo_in_config_exits_2_and_print_config_works(tmp_path, nanochat_current_dir, tiny_shards_dir, capsys):
    cfg = _config(tmp_path, nanochat_current_dir, tiny_shards_dir)
    assert main(["fit", "--config", str(cfg), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["batch_size"] == 64 and printed["model"]["saes"][0]["hook_name"] == HOOK
    assert "n_layer" not in printed["model"] and "d_model" not in printed["model"]  # linked from data
    bad = yaml.safe_load(cfg.read_text())
    bad["data"]["bach_size"] = 3
    cfg.write_text(yaml.safe_dump(bad))
    assert main(["fit", "--config", str(cfg)]) == 2
    assert "bach_size" in capsys.readouterr().err


CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_configs_parse_and_name_every_saelightning_key(config, capsys):
    assert main(["fit", "--config", str(config), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["saes"] and printed["trainer"]["default_root_dir"].startswith("checkpoints/")
    assert "dirpath" not in printed["checkpoint"]  # linked from trainer.default_root_dir
    # every knob of ours is in the YAML (with its comment), not only in the code's defaults
    written = yaml.safe_load(config.read_text())
    for section in ("model", "data", "resample", "export", "histograms", "preemption"):
        linked = {"n_layer", "d_model", "model_info"} if section == "model" else set()
        missing = set(printed[section]) - set(written[section]) - linked
        assert not missing, f"{config.name}: {section} lacks {sorted(missing)}"


@pytest.mark.slow
def test_two_process_ddp_fit_on_cpu_resumes_bitwise(tmp_path, nanochat_current_dir, tiny_shards_dir):
    def fit(run, *extra):
        cfg = _config(tmp_path, nanochat_current_dir, tiny_shards_dir, run=run, max_steps=6)
        return ddp_fit(cfg, tmp_path / run, *extra)

    whole = fit("whole")
    positions = whole["ActivationDataModule"]["positions"]
    assert [p["index"] for p in positions] == [6, 6]  # both ranks' data positions are in the checkpoint
    assert positions[0]["reader"]["workers"] != positions[1]["reader"]["workers"]  # each rank its own stream
    assert whole["state_dict"]["tokens_seen"].item() == 6 * 64 * 2
    fit("parts", "--trainer.max_steps", "4")
    fit("parts", "--ckpt_path", "last")
    a, b = _weights(tmp_path / "whole" / "last.ckpt"), _weights(tmp_path / "parts" / "last.ckpt")
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat_mix"])
def test_eval_on_the_export_reproduces_the_logged_validation(tmp_path, nanochat_current_dir, tiny_shards_dir, chat):
    """Validation and `saelightning eval` read the same val rows and share every metric's definition: eval on
    the exported SAE, over validation's token count in its batches, gives the logged val/* figures. They differ
    only by the scale folded into the exported weights (s·x·W vs x·(s·W): a reordering of d_in-long fp32
    sums, ~d_in·2^-24 relative) and by the fp32 the logger stores. With data.chat the val rows mix in the held-out
    conversations, and eval reads the mix the export records."""
    cfg = _config(tmp_path, nanochat_current_dir, tiny_shards_dir, run="agree", max_steps=10)
    mix = []
    if chat:
        conversations = tmp_path / "chat.jsonl"
        conversations.write_text("\n".join(json.dumps([{"role": "user", "content": f"what is {i}?"},
                                                       {"role": "assistant", "content": f"{i} is a number"}])
                                           for i in range(40)))
        mix = ["--data.chat", str(conversations), "--data.chat_fraction", "0.4"]
    assert main(["fit", "--config", str(cfg), *mix]) == 0
    (export,) = (tmp_path / "agree" / "saes").iterdir()
    logged = json.loads((export / "cfg.json").read_text())["metadata"]["final_metrics"]
    val_tokens = 2 * 4 * 32  # data.val_batches x data.model_batch_rows x context_size
    out = tmp_path / "eval.json"
    assert main(["eval", "--sae", str(export), "--model", str(nanochat_current_dir), "--data", str(tiny_shards_dir),
                 "--tokens", str(val_tokens), "--batch_size", "4", "--context_size", "32", "--out", str(out),
                 "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["tokens_evaluated"] == val_tokens
    evaluated = report["saes"][0]["metrics"]
    compared = [k for k in evaluated if f"val/{k}" in logged]
    assert {"explained_variance", "mse", "cossim", "l0", "ce_loss_score", "kl_div_score"} <= set(compared)
    for key in compared:
        # fractions of latents (a latent at its firing threshold may flip between the two weight layouts)
        counted = key in ("dead_fraction", "frac_alive") or "freq_over" in key
        tolerance = {"abs": 2 / 128} if counted else {"rel": 1e-4, "abs": 1e-6}
        assert evaluated[key] == pytest.approx(logged[f"val/{key}"], **tolerance), key
    # eval with neither --model nor --data takes both from the export's cfg.json: the same rows, the same report
    defaulted = tmp_path / "eval_defaults.json"
    assert main(["eval", "--sae", str(export), "--tokens", str(val_tokens), "--batch_size", "4", "--context_size",
                 "32", "--out", str(defaulted), "--device", "cpu", "--quiet"]) == 0
    again = json.loads(defaulted.read_text())
    assert again["data"] == report["data"] == str(tiny_shards_dir)
    assert again["saes"][0]["metrics"] == report["saes"][0]["metrics"]


def test_fit_bar_shows_loss_ev_l0_and_tokens_per_second(tmp_path, nanochat_current_dir, tiny_shards_dir, capsys):
    two = [{"hook_name": HOOK, "d_sae": 128, "k": 8, "name": "a"},
           {"hook_name": HOOK, "d_sae": 128, "k": 4, "name": "b"}]
    for run, saes, names in (("one", None, ["loss", "EV", "L0"]), ("two", two, ["a.loss", "b.EV", "b.L0"])):
        cfg = _config(tmp_path, nanochat_current_dir, tiny_shards_dir, run=run, saes=saes, max_steps=8,
                      enable_progress_bar=True)
        assert main(["fit", "--config", str(cfg)]) == 0
        captured = capsys.readouterr()
        bar = captured.out + captured.err
        for name in names + ["tok/s"]:
            assert re.search(rf"[ ,]{re.escape(name)}=[-\d.,e]+", bar), (name, bar[-400:])
        assert "v_num" not in bar
    # --trainer.enable_progress_bar false: no bar is added (Lightning would refuse a bar callback with it)
    assert main(["fit", "--config", str(cfg), "--run_name", "nobar", "--trainer.enable_progress_bar", "false"]) == 0
    assert "loss=" not in capsys.readouterr().out


def test_a_run_shorter_than_the_dead_window_exports_its_sparsity(tmp_path, nanochat_current_dir, tiny_shards_dir):
    """sparsity.safetensors is always written: from the window in progress when no window completed, with the
    tokens it counted in cfg.json; a completed window's figure otherwise."""
    from saelightning.export import load_sparsity
    from saelightning.metrics import log10_density

    for run, window, expected in (("short", 10**6, 4 * 64), ("windowed", 128, 128)):
        cfg = _config(tmp_path, nanochat_current_dir, tiny_shards_dir, run=run, max_steps=4, val_check_interval=4)
        config = yaml.safe_load(cfg.read_text())
        config["model"]["dead_window_tokens"] = window
        cfg.write_text(yaml.safe_dump(config))
        assert main(["fit", "--config", str(cfg)]) == 0
        (export,) = (tmp_path / run / "saes").iterdir()
        meta = json.loads((export / "cfg.json").read_text())["metadata"]
        assert meta["sparsity_tokens"] == expected
        state = _weights(tmp_path / run / "last.ckpt")
        prefix = f"states.{export.name}."
        counts = state[prefix + ("window" if run == "short" else "density")]
        density = counts / expected if run == "short" else counts
        assert torch.equal(load_sparsity(export), log10_density(density))
