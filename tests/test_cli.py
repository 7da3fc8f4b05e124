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
    assert len(names) == 12 and names[0] == "blocks.0.hook_resid_pre"
    assert parse_hook("blocks.1.mlp.hook_post", 2) == (1, "mlp.hook_post")
    assert hook_width("blocks.1.mlp.hook_post", 2, 64) == 256
    assert hook_width("blocks.0.hook_attn_out", 2, 64) == 64
    from saelightning.errors import SAELightningError

    with pytest.raises(SAELightningError, match=r"unknown hook point 'blocks.0.resid'.*hook_resid_post"):
        parse_hook("blocks.0.resid", 2)
    with pytest.raises(SAELightningError, match=r"out of range: the model has 2 layers"):
        parse_hook("blocks.2.hook_resid_post", 2)
