"""The shape of the package: no import cycle, every import at the top of its module, leaf modules that the
training and command modules use and that never use them."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "saelightning"
# the modules every other one may use, and that import none of the training or command modules
LEAVES = {"errors", "atomic", "tokens", "resolve", "export", "metrics", "command", "hooks", "demo", "modeldiff"}
TRAINING_AND_COMMANDS = {"train", "module", "data", "callbacks", "checkpointing", "faults", "cache", "evaluate",
                         "runtime", "neuronpedia", "dashboards", "cli", "guard", "optim", "probe", "diff",
                         "parallel"}


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _targets(node: ast.AST, known: set[str]) -> list[str]:
    """The package modules an import statement loads (a `from pkg import sub` names the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
        return subs or ([node.module] if node.module in known else [])
    return []


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: {t for node in ast.walk(tree) for t in _targets(node, known)} - {name}
            for name, tree in modules.items()}


def test_no_import_cycle_in_the_package():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


# rustbpe is optional (the dev extra): the one function that trains a tokenizer imports it, and says which pip
# command to run without it
OPTIONAL_IMPORTS = {"saelightning.nanochat.tokenizer.train_tokenizer"}


def test_every_import_is_at_the_top_of_its_module():
    """Imports inside functions hide the real dependencies (and held the old cycles together). The two lazy
    places keep `saelightning --help` and `import saelightning` fast: the CLI imports the chosen subcommand's
    module, and the package exposes its API on first use; both go through importlib, not import statements."""
    inner = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if f"{name}.{node.name}" not in OPTIONAL_IMPORTS:
                    inner += [f"{name}.{node.name}:{n.lineno}" for n in ast.walk(node)
                              if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not inner, inner


def test_leaf_modules_never_use_the_training_or_command_modules():
    graph = _graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    for leaf in LEAVES:
        used = {m.split(".")[1] for m in reach(f"saelightning.{leaf}") if m.count(".") >= 1}
        assert not used & TRAINING_AND_COMMANDS, f"{leaf} reaches {sorted(used & TRAINING_AND_COMMANDS)}"
