"""The offline demo: stdlib corpus, its cached shards, and the committed demo model."""

import json
import math
import sysconfig
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from saelightning.demo import (
    DEMO_MODEL_DIR,
    MANIFEST,
    SKIP_DIRS,
    TARGET_CHARS,
    default_cache_dir,
    demo_corpus,
    docstring_entries,
    ensure_demo_shards,
    split_source,
    stdlib_files,
)
from saelightning.errors import SAELightningError
from saelightning.nanochat.shards import TextStream, list_shards


def test_corpus_is_deterministic_and_from_stdlib():
    first = list(demo_corpus(max_docs=30))
    assert first == list(demo_corpus(max_docs=30)) and len(first) == 30
    assert all(isinstance(d, str) and d.strip() and len(d) <= 2 * TARGET_CHARS for d in first)
    base = Path(sysconfig.get_paths()["stdlib"])
    relative = [p.relative_to(base).as_posix() for p in stdlib_files()]
    assert relative == sorted(relative) and "os.py" in relative and "json/decoder.py" in relative
    assert not any(part in SKIP_DIRS for r in relative for part in r.split("/")[:-1])


def test_split_source_cuts_at_top_level_and_loses_nothing():
    funcs = [f"def f{i}(x):\n    '''Doc {i}.'''\n" + "    y = x + 1\n" * 40 + "    return y\n\n\n" for i in range(20)]
    text = "import os\n\n\n" + "".join(funcs)
    pieces = split_source(text)
    assert "".join(pieces) == text and len(pieces) > 1
    assert all(len(p) <= TARGET_CHARS for p in pieces)
    assert all(p.startswith(("import", "def ")) for p in pieces)  # cut only at top-level statements
    huge = "class Big:\n" + "".join(f"    def m{i}(self):\n        return {i}\n\n" for i in range(400))
    parts = split_source(huge)
    assert "".join(parts) == huge and all(len(p) <= 2 * TARGET_CHARS for p in parts) and len(parts) > 2


def test_docstring_entries_look_like_pydoc():
    source = '"""Tools."""\n\ndef add(a, b=2, *rest):\n    """Add things."""\n\ndef _hidden():\n    """No."""\n\n' \
             'class Box:\n    """A box."""\n    def open(self):\n        """Open it."""\n'
    text = "".join(docstring_entries(source, "pkg.tools"))
    assert "NAME\n    pkg.tools" in text and "    Tools." in text
    assert "def add(a, b=2, *rest)\n    Add things." in text
    assert "class Box\n    A box." in text and "    def open(self)\n        Open it." in text
    assert "_hidden" not in text
    assert docstring_entries("def (:", "broken") == []


def test_ensure_demo_shards_builds_once(tmp_path):
    cache = tmp_path / "cache"
    out = ensure_demo_shards(cache, max_docs=40)
    assert out == cache
    train, val = list_shards(out)
    assert len(train) == 9
    docs = list(TextStream(train + [val], loop=False, shuffle=False))
    assert len(docs) == 40 and sorted(docs) == sorted(demo_corpus(max_docs=40))
    assert docs != list(demo_corpus(max_docs=40))  # shuffled, so val is not just the last modules
    assert pq.read_schema(val).names == ["text"]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["docs"] == 40 and manifest["max_docs"] == 40
    stamp = val.stat().st_mtime_ns
    assert ensure_demo_shards(cache, max_docs=40) == out and val.stat().st_mtime_ns == stamp  # cached
    ensure_demo_shards(cache, max_docs=20)  # a different corpus size replaces the cache
    assert sum(1 for _ in TextStream(list_shards(out)[0] + [list_shards(out)[1]], loop=False)) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no temp dirs left behind


def test_ensure_demo_shards_refuses_foreign_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SAELightningError, match="not a demo shard cache"):
        ensure_demo_shards(tmp_path, max_docs=4)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SAELIGHTNING_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "demo_shards"
    monkeypatch.delenv("SAELIGHTNING_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "saelightning" / "demo_shards"


def test_committed_demo_model_loads():
    from saelightning.nanochat.checkpoint import load_nanochat

    assert (DEMO_MODEL_DIR / "tokenizer" / "tokenizer.pkl").is_file()
    size = sum(f.stat().st_size for f in DEMO_MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    nc = load_nanochat(DEMO_MODEL_DIR)
    cfg = nc.model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.vocab_size) == (4, 128, 2, 1, 4096)
    assert nc.meta["era"] == "current" and nc.tokenizer.vocab_size == 4096 and nc.meta["val_bpb"] > 0
    # It learned Python: the loss on stdlib-like code is far below a uniform guess.
    ids = torch.tensor([nc.tokenizer.encode("def read(path):\n    with open(path) as f:\n        return f.read()\n")])
    with torch.no_grad():
        logits = nc.model(ids[:, :-1])
    loss = F.cross_entropy(logits[0], ids[0, 1:]).item()
    assert loss < 0.6 * math.log(4096)


def test_docstring_questions_and_the_chat_format():
    from saelightning.demo import docstring_questions
    from saelightning.nanochat.checkpoint import load_nanochat

    text = 'def join(a, *p):\n    """Join two paths.\n\n    More text."""\n\ndef _private():\n    """No."""\n'
    assert docstring_questions(text, "posixpath") == [[
        {"role": "user", "content": "What does posixpath.join(a, *p) do?"},
        {"role": "assistant", "content": "Join two paths."}]]
    tok = load_nanochat(DEMO_MODEL_DIR).tokenizer
    ids, mask = tok.render_conversation(docstring_questions(text, "posixpath")[0])
    special = {name: tok.encode_special(f"<|{name}|>") for name in
               ("bos", "user_start", "user_end", "assistant_start", "assistant_end")}
    assert ids[:2] == [special["bos"], special["user_start"]] and ids[-1] == special["assistant_end"]
    start = ids.index(special["assistant_start"])
    # the SFT mask: the assistant's text and its end token, nothing of the user's turn
    assert mask == [0] * (start + 1) + [1] * (len(ids) - start - 1)
    assert tok.decode(ids[start + 1:-1]) == "Join two paths."


def test_committed_chat_stage_loads_and_answers_in_the_chat_format():
    from saelightning.nanochat.checkpoint import load_nanochat

    chat = load_nanochat(DEMO_MODEL_DIR, source="sft")
    base = load_nanochat(DEMO_MODEL_DIR)
    assert chat.meta["source"] == {"stage": "base", "tag": "d4", "step": base.meta["step"]}
    assert chat.model.config == base.model.config
    assert chat.meta["val_loss_assistant"] < chat.meta["val_loss_assistant_before"]
    # after <|assistant_start|> the chat model puts far more mass on ending a reply than the base model does
    ids, _ = chat.tokenizer.render_conversation([{"role": "user", "content": "What does os.getcwd() do?"},
                                                 {"role": "assistant", "content": "Return the current directory."}])
    x = torch.tensor([ids[:-1]])
    end = ids[-1]
    with torch.no_grad():
        p_chat = chat.model(x)[0, -1].softmax(-1)[end]
        p_base = base.model(x)[0, -1].softmax(-1)[end]
    assert p_chat > 10 * p_base
