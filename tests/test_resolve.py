"""What a command takes from an exported SAE's cfg.json when --model / --data are not given."""

import json

import pytest

from saelightning import resolve
from saelightning.demo import DEMO_MODEL_DIR
from saelightning.errors import SAELightningError


def _export(directory, metadata):
    directory.mkdir(parents=True)
    (directory / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8, "metadata": metadata}))
    return directory


def test_defaults_come_from_trained_on_and_a_flag_overrides(tmp_path):
    model, data = tmp_path / "model", tmp_path / "shards"
    model.mkdir()
    data.mkdir()
    sae = _export(tmp_path / "sae", {"trained_on": {"model": str(model), "step": 7, "era": None, "source": "sft",
                                                     "model_tag": "d4", "data": str(data)}})
    assert resolve.sources([sae], None, None) == (str(model), {"step": 7, "source": "sft", "model_tag": "d4"},
                                                   str(data))
    assert resolve.sources([sae], None, "demo") == (str(model), {"step": 7, "source": "sft", "model_tag": "d4"},
                                                     "demo")
    # --model given: nothing is taken from cfg.json (its step and data belong to the recorded model)
    assert resolve.sources([sae], "demo", None) == ("demo", {}, None)


def test_exports_before_trained_on_use_the_checkpoint_dir_and_step(tmp_path):
    ckpt = tmp_path / "base_checkpoints" / "d4"
    ckpt.mkdir(parents=True)
    sae = _export(tmp_path / "old", {"model": {"path": str(ckpt), "step": 500, "era": "current"}})
    assert resolve.sources([sae], None, None) == (str(ckpt), {"step": 500, "era": "current"}, None)


def test_a_moved_model_or_data_dir_is_one_line_naming_the_path_and_the_flag(tmp_path):
    gone = _export(tmp_path / "a", {"trained_on": {"model": str(tmp_path / "moved"), "data": "demo"}})
    with pytest.raises(SAELightningError, match=r"trained on the model at .*moved, which is not there now; pass "
                                                r"--model"):
        resolve.sources([gone], None, None)
    (tmp_path / "here").mkdir()
    no_data = _export(tmp_path / "b", {"trained_on": {"model": str(tmp_path / "here"), "data": str(tmp_path / "x")}})
    with pytest.raises(SAELightningError, match=r"shards in .*x, which are not there now; pass --data"):
        resolve.sources([no_data], None, None)
    assert resolve.sources([no_data], None, "demo")[2] == "demo"  # --data overrides the missing one
    with pytest.raises(SAELightningError, match="records no model; pass --model"):
        resolve.sources([_export(tmp_path / "c", {})], None, None)


def test_saes_of_two_models_need_model(tmp_path):
    one = _export(tmp_path / "one", {"trained_on": {"model": "demo"}})
    two = _export(tmp_path / "two", {"trained_on": {"model": "demo", "step": 3}})
    with pytest.raises(SAELightningError, match="trained on different models .* pass --model"):
        resolve.sources([one, two], None, None)
    assert resolve.sources([one, one], None, None) == ("demo", {}, None)


def test_the_demo_model_by_path_reads_the_demo_shards():
    assert resolve._is_demo("demo") and resolve._is_demo(str(DEMO_MODEL_DIR))
    assert resolve._is_demo(str(DEMO_MODEL_DIR / "base_checkpoints" / "d4"))
    assert not resolve._is_demo(str(DEMO_MODEL_DIR.parent))
