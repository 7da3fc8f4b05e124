"""Token labels for probing: which concepts each token of a text belongs to.

Labels are made per character, then carried to tokens. Two sources:

- Python source, labelled offline by the standard library's own `tokenize` and `ast` (CONCEPTS below).
  A document is labelled from the file it was cut from when that file is known (`SourceIndex`: the demo
  shards are pieces of the standard library's files, so a piece cut from inside a class still knows it is
  in a class body); otherwise from its own text: the whole document when it parses, else each top-level
  block (a line at column 0 after a blank line starts one) that parses on its own. Characters of text that
  does not parse (prose, pydoc-like text, a piece cut mid-block) are unlabelled: they are neither positive
  nor negative for any concept, and are counted in the report.
- A user file of character spans (JSONL, `read_label_file`), for any text and any concepts.

A token has a concept when any character it covers has it (a token that splits a multi-byte character
covers that character); it is labelled when every character it covers is. BOS is never labelled.
"""

from __future__ import annotations

import ast
import bisect
import builtins
import io
import json
import keyword
import tokenize
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saelightning.errors import SAELightningError

CONCEPTS = {
    "string": "inside a string literal: quotes and prefix included, docstrings and f-strings too",
    "docstring": "inside a docstring: a string literal that is the first statement of a module, class or def",
    "comment": "inside a comment, from # to the end of the line",
    "keyword": "a keyword (keyword.kwlist: def, return, if, None, ...)",
    "builtin": "a name of the builtins module (print, len, ValueError, ...), not after a '.'",
    "identifier": "any other name (variables, attributes, self, ...)",
    "number": "a number literal",
    "operator": "an operator of the Python reference's list: + - * ** / // % @ << >> & | ^ ~ := < > <= >= == != "
                "(delimiters such as = , : . -> += are not)",
    "bracket_depth_ge1": "inside at least one pair of brackets: (), [] or {} (the brackets themselves are outside)",
    "bracket_depth_ge2": "inside at least two nested pairs of brackets",
    "function_body": "inside the body of a def or async def: from its first statement to the end of its last",
    "class_body": "inside the body of a class: from its first statement to the end of its last",
}
PYTHON_CONCEPTS = list(CONCEPTS)
_C = {name: i for i, name in enumerate(PYTHON_CONCEPTS)}

OPERATORS = frozenset("+ - * ** / // % @ << >> & | ^ ~ := < > <= >= == !=".split())
_OPEN, _CLOSE = frozenset("([{"), frozenset(")]}")
# `site` adds these to builtins (absent under python -S): left out so the labels do not depend on it
_SITE_NAMES = {"copyright", "credits", "license", "exit", "quit", "help"}
BUILTIN_NAMES = frozenset(n for n in dir(builtins) if not n.startswith("_")) - set(keyword.kwlist) - _SITE_NAMES
# f-strings (3.12+) and t-strings (3.14+) come as START / MIDDLE / END tokens: the span is one string
_STRING_STARTS = {getattr(tokenize, n) for n in ("FSTRING_START", "TSTRING_START") if hasattr(tokenize, n)}
_STRING_ENDS = {getattr(tokenize, n) for n in ("FSTRING_END", "TSTRING_END") if hasattr(tokenize, n)}
_LAYOUT = {tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT, tokenize.ENDMARKER}


def _line_starts(text: str) -> list[int]:
    """Character offset of each line's start; lines end at '\\n', as tokenize and ast count them."""
    starts = [0]
    find = text.find
    i = find("\n")
    while i >= 0:
        starts.append(i + 1)
        i = find("\n", i + 1)
    return starts


def python_char_labels(text: str, module_docstring: bool = True,
                       region: tuple[int, int] | None = None) -> np.ndarray | None:
    """bool [len(text), len(PYTHON_CONCEPTS)]: each character's concepts, or None when text is not Python
    that ast parses. module_docstring=False: a leading string statement is not a docstring (text that does
    not start a file). region=(start, end): the labels of text[start:end] only ([end - start, C])."""
    parsed = ParsedPython.parse(text)
    if parsed is None:
        return None
    return parsed.labels(*(region or (0, len(text))), module_docstring=module_docstring)


class ParsedPython:
    """Python text parsed once by ast; labels() tokenizes and walks only the top-level statements that reach
    into the characters asked for (a 4 KB piece of a 700 KB file costs about what the piece alone would)."""

    def __init__(self, text: str, tree: ast.Module):
        self.text, self.tree, self.starts = text, tree, _line_starts(text)

    @classmethod
    def parse(cls, text: str) -> ParsedPython | None:
        if "\r" in text.replace("\r\n", ""):
            return None  # a lone CR ends a line for ast but not for tokenize here: offsets would disagree
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences and the like
                return cls(text, ast.parse(text))
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            return None

    def _lines(self, start: int, end: int) -> tuple[int, int, list]:
        """(first line, last line) to tokenize (1-based, inclusive; both on top-level statement boundaries)
        covering characters [start, end), and the top-level statements inside them."""
        body, starts = self.tree.body, self.starts
        first, last = bisect.bisect_right(starts, start), bisect.bisect_right(starts, max(end - 1, start))

        def head(node):  # a statement's first line, its decorators included
            return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", ())])

        lo, hi, inside = 1, len(starts), []
        for i, node in enumerate(body):
            if node.end_lineno < first:
                if i + 1 == len(body) or head(body[i + 1]) > node.end_lineno:  # not `a = 1; b = 2`
                    lo = node.end_lineno + 1
            elif head(node) > last and (i == 0 or body[i - 1].end_lineno < head(node)):
                hi = head(node) - 1
                break
            else:
                inside.append(node)
        return lo, hi, inside

    def labels(self, start: int, end: int, module_docstring: bool = True) -> np.ndarray | None:
        text, starts = self.text, self.starts
        lo, hi, inside = self._lines(start, end)
        base = starts[lo - 1]
        segment = text[base:starts[hi] if hi < len(starts) else len(text)]
        try:
            tokens = list(tokenize.generate_tokens(io.StringIO(segment).readline))
        except (SyntaxError, tokenize.TokenError):
            return None
        n = len(segment)
        labels = np.zeros((n, len(PYTHON_CONCEPTS)), dtype=bool)
        depth_change = np.zeros(n + 1, dtype=np.int32)
        rows = len(starts) - lo + 1

        def at(row: int, col: int) -> int:  # tokenize's (row, col) in the segment -> its character offset
            return min(starts[row + lo - 2] + col - base, n) if row <= rows else n

        previous, nested, string_start = None, 0, 0
        for tok in tokens:
            kind, s = tok.type, tok.string
            a, b = at(*tok.start), at(*tok.end)
            if kind in _STRING_STARTS:
                string_start = a if nested == 0 else string_start
                nested += 1
                continue
            if kind in _STRING_ENDS:
                nested -= 1
                if nested == 0:
                    labels[string_start:b, _C["string"]] = True
                    previous = tok
                continue
            if nested:  # the parts of an f-string: all string, as its one STRING token is before 3.12
                continue
            if kind == tokenize.STRING:
                labels[a:b, _C["string"]] = True
            elif kind == tokenize.COMMENT:
                labels[a:b, _C["comment"]] = True
            elif kind == tokenize.NAME:
                if s in keyword.kwlist:
                    labels[a:b, _C["keyword"]] = True
                elif s in BUILTIN_NAMES and not (previous is not None and previous.string == "."):
                    labels[a:b, _C["builtin"]] = True
                else:
                    labels[a:b, _C["identifier"]] = True
            elif kind == tokenize.NUMBER:
                labels[a:b, _C["number"]] = True
            elif kind == tokenize.OP:
                if s in OPERATORS:
                    labels[a:b, _C["operator"]] = True
                elif s in _OPEN:
                    depth_change[b] += 1  # what follows the bracket is inside it
                elif s in _CLOSE:
                    depth_change[a] -= 1  # the closing bracket itself is outside
            if kind not in _LAYOUT:
                previous = tok
        depth = np.cumsum(depth_change[:n])
        labels[:, _C["bracket_depth_ge1"]] = depth >= 1
        labels[:, _C["bracket_depth_ge2"]] = depth >= 2
        self._label_ast(inside, labels, base, module_docstring)
        return labels[start - base:end - base]

    def _label_ast(self, nodes: list, labels: np.ndarray, base: int, module_docstring: bool) -> None:
        text, starts, n = self.text, self.starts, len(labels)

        def at(row: int, byte_col: int) -> int:  # ast columns are UTF-8 byte offsets into the line
            line = text[starts[row - 1]:starts[row] if row < len(starts) else len(text)]
            col = byte_col if line.isascii() else len(line.encode("utf-8")[:byte_col].decode("utf-8", "ignore"))
            return min(max(starts[row - 1] + col - base, 0), n)

        def mark(first: ast.AST, last: ast.AST, column: str) -> None:
            labels[at(first.lineno, first.col_offset):at(last.end_lineno, last.end_col_offset), _C[column]] = True

        def docstring(body: list) -> None:
            head = body[0] if body else None
            if isinstance(head, ast.Expr) and isinstance(head.value, ast.Constant) and isinstance(head.value.value,
                                                                                                  str):
                mark(head, head, "docstring")

        if module_docstring and nodes and nodes[0] is self.tree.body[0]:
            docstring(self.tree.body)
        for top in nodes:
            for node in ast.walk(top):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    mark(node.body[0], node.body[-1], "class_body" if isinstance(node, ast.ClassDef)
                         else "function_body")
                    docstring(node.body)


def top_level_blocks(text: str) -> list[tuple[int, str]]:
    """(offset, block) pieces of text, cut before every line that starts at column 0 after a blank line."""
    starts = _line_starts(text)
    lines = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    cuts = [0] + [starts[i] for i in range(1, len(lines))
                  if lines[i][:1] not in ("", " ", "\t", "\n", "\r", "\f") and not lines[i - 1].strip()]
    return [(a, text[a:b]) for a, b in zip(cuts, cuts[1:] + [len(text)]) if b > a]


@dataclass
class CharLabels:
    """One document's character labels: labels [n_chars, n_concepts] and known [n_chars] (labelled at all)."""

    labels: np.ndarray
    known: np.ndarray
    status: str  # "source" (labelled from its file), "parsed" (whole), "partial" (some blocks), "unparsed", "user"


def label_python_document(text: str) -> CharLabels:
    """A document's Python labels from its own text: the whole of it when it parses, else each top-level block
    that parses on its own (a leading string is a module docstring only at the document's start)."""
    n = len(text)
    whole = python_char_labels(text)
    if whole is not None:
        return CharLabels(whole, np.ones(n, dtype=bool), "parsed")
    labels = np.zeros((n, len(PYTHON_CONCEPTS)), dtype=bool)
    known = np.zeros(n, dtype=bool)
    for offset, block in top_level_blocks(text):
        part = python_char_labels(block, module_docstring=offset == 0)
        if part is not None:
            labels[offset:offset + len(block)] = part
            known[offset:offset + len(block)] = True
    return CharLabels(labels, known, "partial" if known.any() else "unparsed")


def label_python_documents(docs: Sequence[str], sources: Sequence[tuple[str, int] | None] | None = None
                           ) -> list[CharLabels]:
    """Each document's Python labels: from its source (the text of the file it was cut from and its offset
    there, from SourceIndex.locate) when that file parses, so a piece knows the class or def it is in; else
    from its own text (label_python_document). Each file is labelled once."""
    sources = sources or [None] * len(docs)
    files: dict[int, ParsedPython | None] = {}
    out = []
    for text, source in zip(docs, sources):
        if source is not None:
            file_text, offset = source
            if id(file_text) not in files:
                files[id(file_text)] = ParsedPython.parse(file_text)
            parsed = files[id(file_text)]
            if parsed is not None and file_text[offset:offset + len(text)] == text:
                labels = parsed.labels(offset, offset + len(text))
                if labels is not None:
                    out.append(CharLabels(labels, np.ones(len(text), dtype=bool), "source"))
                    continue
        out.append(label_python_document(text))
    return out


class SourceIndex:
    """Finds the Python file each document was cut from, for documents that are verbatim slices of files
    (the demo shards' source pieces are slices of the standard library's files)."""

    def __init__(self, files: Iterable[str | Path]):
        self.files = [Path(f) for f in files]

    def locate(self, docs: Sequence[str]) -> list[tuple[str, int] | None]:
        """For each document, (the text of a file holding it, its offset there), or None."""
        found: list[tuple[str, int] | None] = [None] * len(docs)
        wanted: dict[str, list[int]] = {}
        for i, doc in enumerate(docs):
            key = max(doc.split("\n"), key=len)  # its longest line: found in few files
            if len(key.strip()) >= 8:
                wanted.setdefault(key, []).append(i)
        left = sum(map(len, wanted.values()))
        for path in self.files:
            if not left:
                break
            text = _read_source(path)
            if not text:
                continue
            for line in set(text.split("\n")) & wanted.keys():
                for i in wanted[line]:
                    if found[i] is None and (offset := text.find(docs[i])) >= 0:
                        found[i] = (text, offset)
                        left -= 1
        return found


def _read_source(path: Path) -> str | None:
    try:
        with tokenize.open(path) as f:  # honours PEP 263 encoding declarations, as the demo corpus read them
            return f.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------------------------------------
# Characters -> tokens


def token_char_spans(text: str, token_lengths: np.ndarray, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(first char, end char) of each token of text (ids without BOS); token_lengths[id] = its UTF-8 bytes.

    A token that ends or starts inside a multi-byte character covers that character."""
    data = text.encode("utf-8")
    lengths = token_lengths[np.asarray(ids, dtype=np.int64)]
    ends = np.cumsum(lengths, dtype=np.int64)
    if (int(ends[-1]) if len(ends) else 0) != len(data):
        raise SAELightningError("the tokenizer's tokens do not spell the document's UTF-8 bytes; "
                                "use the tokenizer the model was trained with")
    if not len(ends):
        return ends, ends
    char_of_byte = np.cumsum((np.frombuffer(data, dtype=np.uint8) & 0xC0) != 0x80) - 1
    return char_of_byte[ends - lengths], char_of_byte[ends - 1] + 1


def token_labels(chars: CharLabels, first: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels [T, C], labelled [T]) of tokens covering characters [first, end): any character's concepts;
    labelled when every character is."""
    pad = np.zeros((1, chars.labels.shape[1]), dtype=np.int64)
    cum = np.concatenate([pad, np.cumsum(chars.labels, axis=0, dtype=np.int64)])
    unknown = np.concatenate([[0], np.cumsum(~chars.known, dtype=np.int64)])
    return (cum[end] - cum[first]) > 0, (unknown[end] - unknown[first]) == 0


# ---------------------------------------------------------------------------------------------
# A user file of labels


def read_label_file(path: str | Path) -> tuple[list[str], list[dict[str, list[tuple[int, int]]]], list[str]]:
    """JSONL, one document per line: {"text": "...", "labels": {"concept": [[start, end], ...], ...}}.

    start/end are character offsets into text (Python string indices: code points), end exclusive. The
    concepts are all those any line names; a concept a line does not name has no positive in that document
    (every document is fully labelled). Blank lines are skipped. Returns (texts, spans, concepts)."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SAELightningError(f"--labels {path} does not exist; pass a JSONL file of labelled documents") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SAELightningError(f"cannot read --labels {path} ({type(e).__name__}: {e}); pass a UTF-8 JSONL "
                                "file") from None
    texts, spans, concepts = [], [], {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--labels {path} line {number}"
        try:
            record = json.loads(line)
        except ValueError as e:
            raise SAELightningError(f"{where} is not JSON ({e}); write one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not isinstance(
                record.get("labels", {}), dict):
            raise SAELightningError(f'{where} must be an object {{"text": "...", "labels": {{"concept": [[start, '
                                    'end], ...]}}}} with a string text')
        text = record["text"]
        doc = {}
        for concept, ranges in record.get("labels", {}).items():
            if not concept or not isinstance(ranges, list):
                raise SAELightningError(f"{where}: labels[{concept!r}] must be a list of [start, end] character "
                                        "spans under a non-empty concept name")
            doc[concept] = []
            for r in ranges:
                if not (isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r)):
                    raise SAELightningError(f"{where}: span {r!r} of {concept!r} must be [start, end], two integers")
                if not 0 <= r[0] < r[1] <= len(text):
                    raise SAELightningError(f"{where}: span {r} of {concept!r} is not within the text's "
                                            f"{len(text)} characters with start < end (end is exclusive)")
                doc[concept].append((r[0], r[1]))
            concepts.setdefault(concept, None)
        texts.append(text)
        spans.append(doc)
    if not texts:
        raise SAELightningError(f"--labels {path} holds no documents; write one JSON object per line")
    if not concepts:
        raise SAELightningError(f"--labels {path} names no concept; give each document a \"labels\" object")
    return texts, spans, list(concepts)


def span_char_labels(text: str, spans: dict[str, list[tuple[int, int]]], concepts: Sequence[str]) -> CharLabels:
    """A user document's character labels from its spans (every character labelled)."""
    labels = np.zeros((len(text), len(concepts)), dtype=bool)
    for j, concept in enumerate(concepts):
        for a, b in spans.get(concept, ()):
            labels[a:b, j] = True
    return CharLabels(labels, np.ones(len(text), dtype=bool), "user")
