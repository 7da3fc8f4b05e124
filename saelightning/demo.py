"""The offline demo: a corpus every Python install has (the standard library), its shards, the model.

demo_corpus() turns the standard library's .py files into documents: the source, cut into pieces of
a few KB at top-level boundaries, and a pydoc-like text of each module's docstrings (read with ast,
so nothing is imported). ensure_demo_shards() writes that corpus once as nanochat parquet shards.
DEMO_MODEL_DIR is the nanochat model trained on it by scripts/build_demo_model.py.
"""

from __future__ import annotations

import ast
import json
import math
import os
import random
import sysconfig
import tokenize
import warnings
from collections.abc import Iterator
from pathlib import Path

from saelightning.atomic import atomic_dir
from saelightning.errors import SAELightningError
from saelightning.nanochat.shards import write_shards

# The bundled model, in nanochat's layout: base_checkpoints/d4/ and tokenizer/ (works from an editable install).
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "nanochat-demo"

TARGET_CHARS = 4000  # documents are packed up to about this size
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
DEMO_SHARDS = 10  # the last one is val, so val is a tenth of the corpus
DEMO_ROW_GROUP = 64  # small row groups: ranks x DataLoader workers all get a share of each shard
SHUFFLE_SEED = 0
MANIFEST = "demo_corpus.json"
FORMAT = 1  # bump when the corpus recipe changes, so old caches are rebuilt


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The standard library's .py files (tests and site-packages left out), sorted by relative path."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        found += [Path(folder) / f for f in files if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(base).as_posix())


def _read_source(path: Path) -> str | None:
    try:
        with tokenize.open(path) as f:  # honours PEP 263 encoding declarations
            return f.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _pack(blocks: list[str], target: int = TARGET_CHARS) -> list[str]:
    """Greedily join consecutive blocks into documents of at most ~target chars."""
    docs, current = [], ""
    for block in blocks:
        if current and len(current) + len(block) > target:
            docs.append(current)
            current = ""
        current += block
    if current.strip():
        docs.append(current)
    return [d for d in docs if d.strip()]


def _split_lines(text: str, at) -> list[str]:
    """Cut text before every line i for which at(lines, i) is true."""
    lines = text.splitlines(keepends=True)
    blocks, start = [], 0
    for i in range(1, len(lines)):
        if at(lines, i):
            blocks.append("".join(lines[start:i]))
            start = i
    blocks.append("".join(lines[start:]))
    return blocks


def _top_level_start(lines: list[str], i: int) -> bool:
    # A top-level statement after a blank line: a def/class (with its decorators and comments) or code.
    return lines[i][:1] not in ("", " ", "\t", "\n", "\r") and not lines[i - 1].strip()


def _after_blank(lines: list[str], i: int) -> bool:
    return bool(lines[i].strip()) and not lines[i - 1].strip()


def split_source(text: str, target: int = TARGET_CHARS) -> list[str]:
    """Source cut at top-level boundaries; a block over twice the target is cut at blank lines, then lines."""
    blocks = []
    for block in _split_lines(text, _top_level_start):
        if len(block) <= 2 * target:
            blocks.append(block)
            continue
        for part in _pack(_split_lines(block, _after_blank), target):
            blocks += [part] if len(part) <= 2 * target else _pack(part.splitlines(keepends=True), target)
    return _pack(blocks, target)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    return f"{node.name}({ast.unparse(node.args)})"


def _indent(text: str, prefix: str) -> str:
    return "".join(prefix + line if line.strip() else line for line in text.splitlines(keepends=True))


def docstring_entries(text: str, module: str) -> list[str]:
    """pydoc-like entries: the module's docstring, then each public class/function with its own."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # old invalid escapes in some modules
            tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    doc = ast.get_docstring(tree)
    entries = [f"Help on module {module}:\n\nNAME\n    {module}\n\nDESCRIPTION\n{_indent(doc, '    ')}\n\n"
               if doc else ""]

    def visit(body, prefix: str, depth: int):
        for node in body:
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if node.name.startswith("_") and not (node.name.startswith("__") and node.name.endswith("__")):
                continue  # pydoc leaves private names out too
            doc = ast.get_docstring(node)
            pad = "    " * depth
            if isinstance(node, ast.ClassDef):
                head = f"{pad}class {node.name}"
            else:
                head = f"{pad}{'async def' if isinstance(node, ast.AsyncFunctionDef) else 'def'} {_signature(node)}"
            if doc:
                entries.append(f"{head}\n{_indent(doc, pad + '    ')}\n\n")
            if isinstance(node, ast.ClassDef):
                visit(node.body, f"{prefix}{node.name}.", depth + 1)

    visit(tree.body, "", 0)
    return [e for e in entries if e]


def docstring_questions(text: str, module: str) -> list[list[dict]]:
    """Conversations built offline from one stdlib module: for each public top-level function with a docstring,
    the user asks what module.name(signature) does and the assistant answers with the docstring's first paragraph."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        answer = " ".join(doc.split("\n\n")[0].split()) if doc else ""
        if answer:
            out.append([{"role": "user", "content": f"What does {module}.{_signature(node)} do?"},
                        {"role": "assistant", "content": answer}])
    return out


def demo_conversations(root: str | os.PathLike | None = None) -> list[list[dict]]:
    """Every docstring question of the standard library (sorted by file), as nanochat conversations."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for path in stdlib_files(base):
        text = _read_source(path)
        if text:
            out += docstring_questions(text, _module_name(path.relative_to(base)))
    return out


def _module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def demo_corpus(max_docs: int | None = None, root: str | os.PathLike | None = None) -> Iterator[str]:
    """Documents from the standard library: per file (sorted), its source pieces, then its docstrings."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    count = 0
    for path in stdlib_files(base):
        text = _read_source(path)
        if not text or not text.strip():
            continue
        docs = split_source(text) + _pack(docstring_entries(text, _module_name(path.relative_to(base))))
        for doc in docs:
            if max_docs is not None and count >= max_docs:
                return
            count += 1
            yield doc


def default_cache_dir() -> Path:
    """$SAELIGHTNING_CACHE/demo_shards, else ~/.cache/saelightning/demo_shards."""
    root = os.environ.get("SAELIGHTNING_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "saelightning") / "demo_shards"


def _manifest_ok(folder: Path, max_docs: int | None) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("format") == FORMAT and manifest.get("max_docs") == max_docs


def ensure_demo_shards(cache_dir: str | os.PathLike | None = None, max_docs: int | None = None) -> Path:
    """The demo corpus as nanochat shards in cache_dir (built on first use, atomically); returns the dir."""
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if _manifest_ok(target, max_docs):
        return target
    if target.exists() and any(target.iterdir()) and not (target / MANIFEST).exists():
        raise SAELightningError(f"{target} exists and is not a demo shard cache; pass an empty or new cache_dir")
    docs = list(demo_corpus(max_docs=max_docs))
    if len(docs) < 2:
        raise SAELightningError(f"the demo corpus has {len(docs)} document(s); give max_docs >= 2")
    # Shuffled so that the last shard (val) is a random sample, not the alphabetically last modules.
    random.Random(SHUFFLE_SEED).shuffle(docs)
    with atomic_dir(target) as tmp:  # a concurrent build of the same corpus is simply replaced
        n_shards = min(DEMO_SHARDS, len(docs))
        write_shards(docs, tmp, docs_per_shard=math.ceil(len(docs) / n_shards), row_group_size=DEMO_ROW_GROUP)
        manifest = {"format": FORMAT, "max_docs": max_docs, "docs": len(docs),
                    "chars": sum(map(len, docs)), "stdlib": sysconfig.get_paths()["stdlib"]}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return target
