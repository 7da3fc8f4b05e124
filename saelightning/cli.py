"""The `saelightning` console script.

`fit` and `validate` go to LightningCLI (saelightning.train); the other subcommands are plain
argparse programs, each a `cli_main(argv) -> int` in the module that implements it. Bad input
raises SAELightningError anywhere below: it is printed as one line and the exit code is 2.
"""

from __future__ import annotations

import importlib
import sys

from saelightning.errors import SAELightningError

# subcommand -> (module with cli_main, one-line help)
COMMANDS = {
    "fit": ("saelightning.train", "train SAEs on a frozen nanochat model (LightningCLI)"),
    "validate": ("saelightning.train", "run validation on a checkpoint (LightningCLI)"),
    "cache": ("saelightning.cache", "compute activations once and store them on disk"),
    "eval": ("saelightning.evaluate", "reconstruction and spliced CE/KL metrics of exported SAEs"),
    "viz": ("saelightning.dashboards", "write static HTML feature dashboards"),
    "neuronpedia": ("saelightning.neuronpedia", "write Neuronpedia batch JSON files"),
    "generate": ("saelightning.runtime", "generate text with per-token features and steering"),
    "export": ("saelightning.export", "export SAEs from a Lightning checkpoint"),
}


def _usage() -> str:
    lines = ["usage: saelightning <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`saelightning <command> --help` shows a command's options."]
    return "\n".join(lines)


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
        module = importlib.import_module(COMMANDS[command][0])
        if command in ("fit", "validate"):
            return module.cli_main(argv) or 0
        return module.cli_main(rest) or 0
    except SAELightningError as e:
        print(f"saelightning: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name == COMMANDS[command][0]:
            print(f"saelightning: error: `{command}` is not built yet", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
