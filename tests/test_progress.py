"""The streaming commands' progress bars: on a terminal they show, under --quiet or off a terminal they don't."""

import io
import sys

import pytest

from saelightning.cli import main
from tests.test_evaluate import export_sae


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _argv(command, tmp_path, model_dir, shards_dir):
    sae = export_sae(tmp_path / "sae", "blocks.1.hook_resid_post", 64)
    common = ["--model", str(model_dir), "--data", str(shards_dir), "--device", "cpu"]
    if command == "eval":
        return ["eval", "--sae", str(sae), "--tokens", "128", "--context_size", "32", *common], "eval:"
    if command == "viz":
        return ["viz", "--sae", str(sae), "--tokens", "128", "--context_size", "32", "--out", str(tmp_path / "v"),
                *common], "viz"
    out = tmp_path / "cache"
    return ["cache", "--hooks", "blocks.1.hook_resid_post", "--tokens", "300", "--shard_tokens", "100",
            "--context_size", "32", "--out", str(out), *common], "cache: shuffle pass:"


@pytest.mark.parametrize("command", ["eval", "viz", "cache"])
def test_bar_on_a_terminal_and_quiet_otherwise(command, tmp_path, monkeypatch, nanochat_current_dir, tiny_shards_dir):
    argv, marker = _argv(command, tmp_path, nanochat_current_dir, tiny_shards_dir)
    for run, stream, quiet, shown in (("tty", Terminal(), False, True), ("quiet", Terminal(), True, False),
                                      ("pipe", io.StringIO(), False, False)):
        if command == "cache":
            argv[argv.index("--out") + 1] = str(tmp_path / f"cache-{run}")
        if command == "viz":
            argv[argv.index("--out") + 1] = str(tmp_path / f"viz-{run}")
        monkeypatch.setattr(sys, "stderr", stream)
        assert main(argv + (["--quiet"] if quiet else [])) == 0
        monkeypatch.undo()
        text = stream.getvalue()
        assert (marker in text and "%|" in text) == shown, (run, text[-300:])  # "%|": a tqdm bar was drawn
