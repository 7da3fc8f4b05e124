import pytest

from saelightning.cli import main
from saelightning.hooks import hook_names, hook_width, parse_hook


def test_unknown_command_exits_2(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command 'frobnicate'" in err[0]


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "cache", "eval", "viz", "neuronpedia", "generate", "export"):
        assert f"  {name} " in out


def test_hook_names_parse_and_errors():
    names = hook_names(2)
    assert len(names) == 14 and names[0] == "blocks.0.hook_resid_pre" and "blocks.1.hook_mlp_in" in names
    assert hook_width("blocks.1.hook_mlp_in", 2, 64) == 64
    assert parse_hook("blocks.1.mlp.hook_post", 2) == (1, "mlp.hook_post")
    assert hook_width("blocks.1.mlp.hook_post", 2, 64) == 256
    assert hook_width("blocks.0.hook_attn_out", 2, 64) == 64
    from saelightning.errors import SAELightningError

    with pytest.raises(SAELightningError, match=r"unknown hook point 'blocks.0.resid'.*hook_resid_post"):
        parse_hook("blocks.0.resid", 2)
    with pytest.raises(SAELightningError, match=r"out of range: the model has 2 layers"):
        parse_hook("blocks.2.hook_resid_post", 2)


REQUIRED = {  # each command's required options, as a researcher would type them
    "eval": ["--sae", "a", "b", "--model", "demo"],
    "viz": ["--sae", "a", "--model", "demo", "--out", "viz"],
    "neuronpedia": ["--sae", "a", "--model", "demo", "--out", "np"],
    "generate": ["--model", "demo", "--prompt", "def ", "--prompt", "class "],
    "cache": ["--model", "demo", "--hooks", "blocks.2.hook_resid_post", "--tokens", "1000", "--out", "c"],
    "export": ["--ckpt", "run", "--out", "exported"],
}


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_every_command_takes_print_config_and_config(command, tmp_path, capsys):
    """One jsonargparse definition per command: --print_config prints its options as YAML, and that YAML given
    back with --config is the same configuration (argparse spellings included: dashes, lists, --no-flags)."""
    import yaml

    capsys.readouterr()
    assert main([command, *REQUIRED[command], "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert set(printed) >= {a[2:].replace("-", "_") for a in REQUIRED[command] if a.startswith("--")}
    if command == "eval":
        assert printed["sae"] == ["a", "b"] and printed["batch_size"] == 8
    if command == "generate":
        assert printed["prompt"] == ["def ", "class "]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(printed))
    assert main([command, "--config", str(config), "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == printed


def test_argparse_spellings_reach_the_same_options(capsys):
    import yaml

    capsys.readouterr()
    argv = ["cache", "--model", "demo", "--hooks", "blocks.2.hook_resid_post", "blocks.2.mlp.hook_post", "--tokens",
            "1000", "--out", "c", "--shard-tokens", "500", "--no-shuffle", "--compile", "--print_config"]
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["hooks"] == ["blocks.2.hook_resid_post", "blocks.2.mlp.hook_post"]
    assert printed["shard_tokens"] == 500 and printed["shuffle"] is False and printed["compile_model"] is True
    assert main(["cache", "--model", "demo", "--hooks", "x", "--tokens", "1000", "--out", "c", "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dtype" in err[0] and "saelightning cache --help" in err[0]
