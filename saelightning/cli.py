"""The `saelightning` console script.

`fit` and `validate` go to LightningCLI (saelightning.train); each other subcommand is one jsonargparse
definition (saelightning.command), a function `(argv) -> int` in the module that implements it (COMMANDS
names it as module:function). Bad
input raises SAELightningError anywhere below: it is printed as one line and the exit code is 2. A
Ctrl-C (or SIGTERM) that stops a command before it had anything to save is one line and exit 130 (143).

The subcommand's module is imported only once it is chosen (importlib below), so `saelightning
--help` and a typo'd command answer at once instead of after importing torch and Lightning.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from saelightning.errors import Interrupted, SAELightningError, one_line

# subcommand -> (module:function taking its argv, one-line help)
COMMANDS = {
    "fit": ("saelightning.train:cli_main", "train SAEs on a frozen nanochat model (LightningCLI)"),
    "validate": ("saelightning.train:cli_main", "run validation on a checkpoint (LightningCLI)"),
    "cache": ("saelightning.cache:cli_main", "compute activations once and store them on disk"),
    "eval": ("saelightning.evaluate:cli_main", "reconstruction and spliced CE/KL metrics of exported SAEs"),
    "diff": ("saelightning.diff:cli_main", "model diffing with a crosscoder: Δ, classes, Latent Scaling per latent"),
    "viz": ("saelightning.dashboards:cli_main", "write static HTML feature dashboards"),
    "neuronpedia": ("saelightning.neuronpedia:cli_main", "write Neuronpedia batch JSON files"),
    "generate": ("saelightning.runtime:cli_main", "generate text with per-token features and steering"),
    "features": ("saelightning.runtime:features_cli_main", "show each SAE's top latents on every token of a prompt"),
    "probe": ("saelightning.probe:cli_main", "probe latents for concepts: sparse probing and best single latents"),
    "attribute": ("saelightning.circuits:cli_main", "attribution graph of a prompt through a CLT or transcoders"),
    "export": ("saelightning.checkpointing:cli_main", "export SAEs from a Lightning checkpoint"),
}


# what a Ctrl-C leaves behind, per command (every output is written atomically)
_AFTER_INTERRUPT = {
    "cache": "the chunks and shards written so far are kept: run the same command again to continue",
    "fit": "stopped before training started: nothing was trained or written",
}


def _usage() -> str:
    lines = ["usage: saelightning <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`saelightning <command> --help` shows a command's options."]
    return "\n".join(lines)


def _check_out(rest: list[str]) -> None:
    """An --out that cannot be created fails before any work (no minutes of compute lost to a typo'd path)."""
    outs = ([rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--out"]
            + [a[6:] for a in rest if a.startswith("--out=")])
    for out in outs:
        parent = Path(out).expanduser().absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise SAELightningError(f"cannot write --out {out}: {parent} is not a writable directory; "
                                    "pass another --out")


def main(args: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"saelightning: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    try:
        _check_out(rest)
        module, _, function = COMMANDS[command][0].partition(":")
        run = getattr(importlib.import_module(module), function)
        return run(argv if command in ("fit", "validate") else rest) or 0  # LightningCLI reads the subcommand
    except SAELightningError as e:
        print(f"saelightning: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"saelightning: {e}", file=sys.stderr)
        return 143 if e.signal_name == "SIGTERM" else 130
    except KeyboardInterrupt:
        print(f"saelightning: interrupted; {_AFTER_INTERRUPT.get(command, 'nothing was written')}", file=sys.stderr)
        return 130
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a real bug, keep its traceback
            raise
        print(f"saelightning: error: {e.strerror}: {e.filename}; check that the path exists and is writable",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
