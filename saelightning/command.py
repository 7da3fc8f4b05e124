"""One jsonargparse definition per subcommand: a dataclass whose fields are the command's options.

`parse(Args, argv, prog)` builds the parser from the dataclass (types, defaults, choices and the help
text of its docstring's Args section), so every command takes `--config FILE` (YAML with the same
keys) and `--print_config`, like `fit`. Options are written as the fields are named (`--batch_size`)
or with dashes (`--batch-size`); a list option takes several values (`--sae A B`), repeated flags
(`--prompt x --prompt y`) or a YAML list; a bool option takes `--flag`, `--no-flag` or `--flag false`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from typing import TypeVar

import yaml
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from saelightning.errors import SAELightningError, one_line

T = TypeVar("T")


def _kind(tp) -> str:
    """'list', 'bool' or 'scalar' for a field's type (Optional[...] looked through)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    if tp is bool:
        return "bool"
    return "list" if typing.get_origin(tp) in (list, Sequence) or tp is list else "scalar"


def normalize_argv(argv: Sequence[str], kinds: dict[str, str], aliases: dict[str, str] | None = None) -> list[str]:
    """argparse-style spellings -> jsonargparse's: dashes, multi-value lists, bare and --no- bool flags, aliases."""
    out, lists, order, i, aliases = [], {}, [], 0, aliases or {}
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            out.append(arg)
            i += 1
            continue
        name, eq, value = arg[2:].partition("=")
        key = name.replace("-", "_")
        key = aliases.get(key, key)
        negated = key.startswith("no_") and kinds.get(key[3:]) == "bool"
        if negated:
            out += [f"--{key[3:]}", "false"]
        elif kinds.get(key) == "list":
            values = [value] if eq else []
            while not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--") and argv[i + 1] != "-h":
                values.append(argv[i + 1])
                i += 1
            if key not in lists:
                order.append(key)
                lists[key] = []
            given = _as_list(values[0]) if len(values) == 1 else None  # already a YAML list: [a, b]
            lists[key] += given if given is not None else values
        elif kinds.get(key) == "bool" and not eq and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out += [f"--{key}", "true"]
        elif key in kinds:
            out.append(f"--{key}" + (f"={value}" if eq else ""))
        else:
            out.append(arg)  # --config, --print_config, --help and typos (jsonargparse names them)
        i += 1
    for key in order:
        out += [f"--{key}", json.dumps(lists[key])]
    return out


def _as_list(text: str) -> list | None:
    if not text.lstrip().startswith("["):
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return value if isinstance(value, list) else None


def build_parser(args_type: type, prog: str, description: str | None = None) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description or (args_type.__doc__ or "").split("\n\n")[0],
                            exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with these options as keys")
    parser.add_class_arguments(args_type, as_group=False)
    return parser


def parse(args_type: type[T], argv: Sequence[str], prog: str, description: str | None = None) -> T | None:
    """The command's options as an `args_type` instance; None after --help or --print_config (printed)."""
    kinds = {f.name: _kind(f.type if not isinstance(f.type, str) else typing.get_type_hints(args_type)[f.name])
             for f in dataclasses.fields(args_type)}
    parser = build_parser(args_type, prog, description)
    try:
        namespace = parser.parse_args(normalize_argv(argv, kinds, getattr(args_type, "ALIASES", None)))
    except ArgumentError as e:
        raise SAELightningError(f"{one_line(e)}; `{prog} --help` lists the options") from None
    except SystemExit as e:  # --help / --print_config print and exit 0
        if e.code in (0, None):
            return None
        raise
    values = namespace.as_dict()
    values.pop("config", None)
    return args_type(**{f.name: values[f.name] for f in dataclasses.fields(args_type) if f.name in values})
