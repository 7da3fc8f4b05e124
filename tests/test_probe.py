"""probe.py and labels.py: the Python labeller token by token, every metric against a hand computation, the
user label format, and `saelightning probe` end to end on the tiny fixtures."""

import json
import math

import numpy as np
import pytest
import torch
import yaml

from saelightning.cli import main
from saelightning.errors import SAELightningError
from saelightning.export import load_sae, save_sae
from saelightning.labels import (
    PYTHON_CONCEPTS,
    SourceIndex,
    label_python_document,
    label_python_documents,
    python_char_labels,
    read_label_file,
    span_char_labels,
    token_char_spans,
    token_labels,
)
from saelightning.nanochat.checkpoint import load_nanochat
from saelightning.nanochat.shards import list_shards
from saelightning.probe import (
    SparseLatents,
    balanced_sample,
    binary_scores,
    class_means,
    counts_above,
    dense_columns,
    encode_positions,
    fit_logistic,
    logistic_predict,
    pack_labelled,
    rank_by_mean_difference,
    split_documents,
    threshold_sweep,
    val_shard_tokens,
)
from saelightning.saes import SAEConfig, build_sae
from saelightning.tokens import val_batches

# ---------------------------------------------------------------------------------------------
# The labeller: hand-written snippets, a hand-made tokenization, the labels of every token written out


def tokenized(pieces: list[str], chars, concepts=PYTHON_CONCEPTS):
    """Labels of the tokens `pieces` (which spell the text) as [(token, set of concepts)], in order."""
    lengths = np.array([len(p.encode("utf-8")) for p in pieces])
    first, end = token_char_spans("".join(pieces), lengths, list(range(len(pieces))))
    labels, known = token_labels(chars, first, end)
    assert known.all()
    return [(p, {concepts[j] for j in np.flatnonzero(row)}) for p, row in zip(pieces, labels)]


def python(pieces):
    text = "".join(pieces)
    labels = python_char_labels(text)
    assert labels is not None
    return tokenized(pieces, label_python_document(text))


def test_labels_of_a_function():
    got = python(["def", " f", "(x", "):", "\n   ", ' """', "Doc", '."""', "\n   ", " return", " len", "(x", ")",
                  " +", " 1", "  #", " hi", "\n"])
    body = {"function_body"}
    assert got == [
        ("def", {"keyword"}), (" f", {"identifier"}),
        ("(x", {"identifier", "bracket_depth_ge1"}),  # the bracket is outside itself, x inside
        ("):", set()),  # the closing bracket is outside; ':' is a delimiter, not an operator
        ("\n   ", set()),  # the body starts at its first statement, after the indentation
        (' """', {"string", "docstring"} | body), ("Doc", {"string", "docstring"} | body),
        ('."""', {"string", "docstring"} | body),
        ("\n   ", body),  # between the body's statements
        (" return", {"keyword"} | body), (" len", {"builtin"} | body),
        ("(x", {"identifier", "bracket_depth_ge1"} | body), (")", body),
        (" +", {"operator"} | body), (" 1", {"number"} | body),
        ("  #", {"comment"}),  # the body ends where its last statement does: the comment is outside
        (" hi", {"comment"}), ("\n", set()),
    ]


def test_labels_of_a_class_nested_brackets_and_names():
    got = python(['"""', "M", '."""', "\n", "class", " A", ":", "\n   ", " x", " =", " [", "(", "1", ",", " '", "a",
                  "')", "]", "\n   ", " y", " =", " a", ".", "len", " is", " None", "\n"])
    cls, deep = {"class_body"}, {"class_body", "bracket_depth_ge1", "bracket_depth_ge2"}
    assert got == [
        ('"""', {"string", "docstring"}), ("M", {"string", "docstring"}), ('."""', {"string", "docstring"}),
        ("\n", set()), ("class", {"keyword"}), (" A", {"identifier"}), (":", set()), ("\n   ", set()),
        (" x", {"identifier"} | cls), (" =", cls),  # '=' is a delimiter
        (" [", cls), ("(", cls | {"bracket_depth_ge1"}), ("1", deep | {"number"}), (",", deep),
        (" '", deep | {"string"}), ("a", deep | {"string"}),
        ("')", deep | {"string"}),  # a token has every concept of any character it covers
        ("]", cls), ("\n   ", cls),
        (" y", {"identifier"} | cls), (" =", cls), (" a", {"identifier"} | cls), (".", cls),
        ("len", {"identifier"} | cls),  # an attribute named like a builtin is an identifier
        (" is", {"keyword"} | cls), (" None", {"keyword"} | cls), ("\n", set()),
    ]


def test_a_token_that_splits_a_character_covers_it():
    text = "x = 'é'\n"  # é is two UTF-8 bytes; tokens of 6, 1 and 2 bytes cut it in half
    data = text.encode()
    lengths = np.array([6, 1, 2])
    assert sum(lengths) == len(data)
    first, end = token_char_spans(text, lengths, [0, 1, 2])
    assert first.tolist() == [0, 5, 6] and end.tolist() == [6, 6, 8]  # both of the first two cover é
    labels, _ = token_labels(label_python_document(text), first, end)
    string = PYTHON_CONCEPTS.index("string")
    assert labels[:, string].tolist() == [True, True, True]
    with pytest.raises(SAELightningError, match="do not spell"):
        token_char_spans(text, np.array([6, 1, 1]), [0, 1, 2])


def test_a_document_that_does_not_parse_is_labelled_block_by_block():
    text = "Document 3. The model reads a class.\n\n'''Not a docstring.'''\nx = 1\n"
    chars = label_python_document(text)
    prose = len("Document 3. The model reads a class.\n\n")
    assert chars.status == "partial"
    assert not chars.known[:prose].any() and chars.known[prose:].all()
    string, doc = PYTHON_CONCEPTS.index("string"), PYTHON_CONCEPTS.index("docstring")
    assert chars.labels[prose, string] and not chars.labels[:, doc].any()  # a block inside is no module's start
    prose_only = label_python_document("Help on module x:\n\nNAME\n    x\n")
    assert prose_only.status == "unparsed" and not prose_only.known.any()
    pieces = ["Document", " 3", ".", " The", " model", " reads", " a", " class", ".\n\n", "'''", "Not", " a",
              " docstring", ".'''", "\n", "x", " =", " 1", "\n"]
    lengths = np.array([len(p.encode()) for p in pieces])
    first, end = token_char_spans(text, lengths, list(range(len(pieces))))
    labels, known = token_labels(chars, first, end)
    assert known.tolist() == [False] * 9 + [True] * 10  # ".\n\n" is the prose's: unlabelled
    assert labels[:9].sum() == 0 and labels[pieces.index(" class"), PYTHON_CONCEPTS.index("keyword")] == 0


def test_a_piece_cut_from_a_file_is_labelled_from_that_file(tmp_path):
    source = "import os\n\n\nclass A:\n    def f(self):\n        return os.sep\n\n    def g(self):\n        pass\n"
    (tmp_path / "mod.py").write_text(source)
    piece = "    def g(self):\n        pass\n"  # indented: it does not parse on its own
    assert label_python_document(piece).status == "unparsed"
    located = SourceIndex([tmp_path / "mod.py"]).locate([piece, "not in any file at all"])
    assert located[0] == (source, source.index(piece)) and located[1] is None
    chars, other = label_python_documents([piece, "x = 1\n"], [located[0], None])
    assert chars.status == "source" and other.status == "parsed"
    cls, fn = PYTHON_CONCEPTS.index("class_body"), PYTHON_CONCEPTS.index("function_body")
    at = piece.index("pass")
    assert chars.labels[at, cls] and chars.labels[at, fn] and chars.labels[piece.index("def"), cls]
    # the piece's labels are the file's labels there: only the statements reaching into it are tokenized
    whole = python_char_labels(source)
    np.testing.assert_array_equal(chars.labels, whole[source.index(piece):][:len(piece)])


# ---------------------------------------------------------------------------------------------
# The user label format


def test_label_file_format(tmp_path):
    path = tmp_path / "labels.jsonl"
    lines = [{"text": "Alice met Bob.", "labels": {"name": [[0, 5], [10, 13]]}},
             {"text": "Nobody here.", "labels": {}},
             {"text": "Paris is big.", "labels": {"place": [[0, 5]]}}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    texts, spans, concepts = read_label_file(path)
    assert texts == [x["text"] for x in lines] and concepts == ["name", "place"]
    assert spans[0] == {"name": [(0, 5), (10, 13)]} and spans[1] == {}
    chars = span_char_labels(texts[0], spans[0], concepts)
    assert chars.labels[:, 0].tolist() == [i < 5 or 10 <= i < 13 for i in range(len(texts[0]))]
    assert not chars.labels[:, 1].any() and chars.known.all()  # a concept a line does not name: no positive
    pieces = ["Al", "ice", " met", " B", "ob", "."]
    assert tokenized(pieces, chars, concepts) == [("Al", {"name"}), ("ice", {"name"}), (" met", set()),
                                                  (" B", {"name"}), ("ob", {"name"}), (".", set())]


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 1 is not JSON"),
    ('{"labels": {}}', "must be an object"),
    ('{"text": "abc", "labels": {"x": [[2, 9]]}}', r"span \[2, 9\] of 'x' is not within the text's 3 characters"),
    ('{"text": "abc", "labels": {"x": [[2, 2]]}}', "start < end"),
    ('{"text": "abc", "labels": {"x": [[0.5, 2]]}}', "two integers"),
    ('{"text": "abc", "labels": {"x": [0, 2]}}', "two integers"),
    ('{"text": "abc"}', "names no concept"),
    ("", "holds no documents"),
])
def test_label_file_errors_name_the_line_and_the_fix(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(SAELightningError, match=message):
        read_label_file(path)
    with pytest.raises(SAELightningError, match="does not exist"):
        read_label_file(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------------------------
# The metrics, each against a hand computation


def sparse_of(dense):
    return SparseLatents.from_dense(torch.tensor(dense, dtype=torch.float32))


def test_class_mean_ranking_by_hand():
    # 4 positions x 3 latents; positives at 0 and 2
    acts = [[1.0, 0.0, 4.0],
            [0.0, 0.0, 4.0],
            [3.0, 0.0, 0.0],
            [0.0, 2.0, 0.0]]
    sparse = sparse_of(acts)
    positions, y = torch.tensor([0, 1, 2, 3]), torch.tensor([True, False, True, False])
    mean_pos, mean_neg = class_means(sparse, positions, y)
    # latent 0: (1 + 3) / 2 = 2 vs 0; latent 1: 0 vs 1; latent 2: 2 vs 2
    assert mean_pos.tolist() == [2.0, 0.0, 2.0] and mean_neg.tolist() == [0.0, 1.0, 2.0]
    assert rank_by_mean_difference(mean_pos, mean_neg).tolist() == [0, 1, 2]  # |2|, |-1| (absolute), 0
    # only the sampled positions count: without position 0, latent 0's positive mean is 3
    mean_pos, _ = class_means(sparse, torch.tensor([2, 3]), torch.tensor([True, False]))
    assert mean_pos.tolist() == [3.0, 0.0, 0.0]
    cols = dense_columns(sparse, torch.tensor([3, 0]), torch.tensor([2, 1]))
    assert cols.tolist() == [[0.0, 2.0], [4.0, 0.0]]
    # ties keep the lower index first
    assert rank_by_mean_difference(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 0.0])).tolist() == [0, 1, 2]


def test_binary_scores_by_hand():
    pred = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    y = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    s = binary_scores(pred, y)
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (2, 2, 1, 3)
    assert s["accuracy"] == 5 / 8 and s["precision"] == 2 / 4 and s["recall"] == 2 / 3
    assert s["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)) and s["f1"] == 4 / 7
    none = binary_scores(torch.zeros(3, dtype=torch.bool), torch.tensor([True, False, False]))
    assert none["precision"] == 0.0 and none["recall"] == 0.0 and none["f1"] == 0.0


def test_single_latent_precision_recall_f1_by_hand():
    # 6 positions; labels; latent 0 fires on 0, 1, 3 (values 3, 1, 2); latent 1 fires on 4 only
    acts = [[3.0, 0.0], [1.0, 0.0], [0.0, 0.0], [2.0, 0.0], [0.0, 5.0], [0.0, 0.0]]
    y = torch.tensor([True, False, True, True, False, False])
    mask = torch.ones(6, dtype=torch.bool)
    sparse = sparse_of(acts)
    tp, fp = counts_above(sparse, y, mask, torch.zeros(2))
    assert tp.tolist() == [2, 0] and fp.tolist() == [1, 1]  # fires > 0: latent 0 P 2/3, R 2/3, F1 2/3
    f1, t, tp, fp, positives = threshold_sweep(sparse, y, mask)
    # latent 0: > 0 -> tp 2 fp 1, F1 4/6; > 1 -> tp 2 fp 0, F1 4/5; > 2 -> tp 1, F1 2/4. Best: t = 1
    assert positives == 3
    assert f1[0].item() == pytest.approx(4 / 5) and t[0].item() == 1.0 and (tp[0], fp[0]) == (2, 0)
    assert f1[1].item() == 0.0 and t[1].item() == 0.0  # latent 1 fires on a negative only
    # the mask restricts the positions: without position 1 the best is > 0 (tp 2, fp 0 of 2 positives)
    mask[1], mask[0] = False, False
    f1, t, tp, fp, positives = threshold_sweep(sparse, y, mask)
    assert positives == 2 and f1[0].item() == pytest.approx(2 / 3) and t[0].item() == 0.0
    # equal F1 at two thresholds: the higher one wins
    tied = sparse_of([[2.0], [1.0], [0.0]])
    f1, t, *_ = threshold_sweep(tied, torch.tensor([True, False, True]), torch.ones(3, dtype=torch.bool))
    assert f1[0].item() == pytest.approx(2 / 3) and t[0].item() == 1.0  # > 1: tp 1 fn 1; > 0: tp 1 fp 1 fn 1


def test_logistic_probe_on_separable_toy_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=g)
    score = x[:, 0] + 0.5 * x[:, 2] - 0.2
    x = x[score.abs() > 0.5][:200]  # a margin around the separating plane
    y = x[:, 0] + 0.5 * x[:, 2] > 0.2
    w, b = fit_logistic(x[:100], y[:100])
    assert binary_scores(logistic_predict(x[:100], w, b), y[:100])["accuracy"] == 1.0
    assert binary_scores(logistic_predict(x[100:], w, b), y[100:])["accuracy"] == 1.0
    # the optimum: the objective's gradient is zero there
    z = x[:100].double() @ w + b
    residual = torch.sigmoid(z) - y[:100].double()
    assert (x[:100].double().T @ residual + w).abs().max() < 1e-6 and abs(float(residual.sum())) < 1e-6


def test_logistic_probe_matches_the_hand_solution():
    # n points at x = +1 (positive) and n at x = -1: by symmetry b = 0, and the gradient
    # w + C * sum_i (sigmoid(w x_i) - y_i) x_i = w - 2 n C sigmoid(-w) vanishes at the root of w = 2 n C sigmoid(-w)
    n, C = 5, 0.3
    x = torch.tensor([[1.0]] * n + [[-1.0]] * n)
    y = torch.tensor([True] * n + [False] * n)
    lo, hi = 0.0, 2 * n * C
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid < 2 * n * C / (1 + math.exp(mid)) else (lo, mid)
    w, b = fit_logistic(x, y, C=C)
    assert w.item() == pytest.approx(lo, abs=1e-9) and b == pytest.approx(0.0, abs=1e-9)


def test_split_by_document_and_balanced_samples():
    doc = np.repeat(np.arange(10), 5)
    split = split_documents(doc, 0.2, seed=1)
    assert split.test_docs == 2 and split.train_docs == 8
    assert not (split.train & split.test).any() and (split.train | split.test).all()
    test_docs = set(doc[split.test])
    assert all(split.test[doc == d].all() for d in test_docs)  # whole documents
    with pytest.raises(SAELightningError, match="at least 2"):
        split_documents(np.zeros(5, dtype=np.int64), 0.2, 0)
    y = np.array([True] * 3 + [False] * 10)
    sample = balanced_sample(y, np.ones(13, dtype=bool), 100, np.random.default_rng(0))
    assert y[sample].sum() == 3 and (~y[sample]).sum() == 3  # as many negatives as positives
    assert len(balanced_sample(y, np.ones(13, dtype=bool), 4, np.random.default_rng(0))) == 4


def test_pack_labelled_cuts_rows_as_the_packer_does():
    docs = [[9, 1, 2, 3], [9, 4, 5], [9, 6]]
    labels = [(np.full((len(d), 1), i == 1), np.ones((len(d), 1), dtype=bool)) for i, d in enumerate(docs)]
    rows, doc, lab, _ = pack_labelled(docs, labels, context=3, n_rows=5)
    assert [r.tolist() for r in rows] == [[9, 1, 2], [3, 9, 4], [5, 9, 6]] and doc.tolist() == [0, 0, 0, 0, 1, 1, 1,
                                                                                                  2, 2]
    assert lab[:, 0].tolist() == [False] * 4 + [True] * 3 + [False] * 2
    rows, doc, _, _ = pack_labelled(docs, labels, context=4, n_rows=5, keep_partial=True)
    assert [r.tolist() for r in rows] == [[9, 1, 2, 3], [9, 4, 5, 9], [6]] and len(doc) == 9
    rows, _, _, _ = pack_labelled(docs, labels, context=4, n_rows=5)
    assert len(rows) == 2  # without keep_partial the short last row is dropped, as tokens.Packer does


# ---------------------------------------------------------------------------------------------
# `saelightning probe` end to end on the tiny fixtures

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def probe_sae(tmp_path_factory):
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="topk", d_in=64, d_sae=128, k=8))
    return save_sae(sae, tmp_path_factory.mktemp("sae") / "sae", metadata={"hook_name": HOOK, "context_size": 64})


def test_probe_cli_end_to_end(tmp_path, probe_sae, nanochat_current_dir, tiny_shards_dir, capsys):
    out = tmp_path / "reports" / "probe.json"
    argv = ["probe", "--sae", str(probe_sae), "--model", str(nanochat_current_dir), "--data", str(tiny_shards_dir),
            "--tokens", "3000", "--train-size", "200", "--test-size", "100", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "best single latent" in printed and "report written to" in printed
    report = json.loads(out.read_text())
    assert list(report["concepts"]) == PYTHON_CONCEPTS and report["context_size"] == 64
    assert report["tokens_read"] == 47 * 64  # the first ceil(3000 / 64) rows
    docs = report["documents"]
    # the fixture documents are a sentence, then a Python snippet (some snippets use a keyword as a name)
    assert docs["partial"] > 0 and docs.get("parsed", 0) == 0 and docs["read"] == sum(
        v for k, v in docs.items() if k != "read")
    assert 0 < report["tokens_labelled"] < report["tokens_read"]
    assert report["split"]["test_documents"] == round(0.2 * docs["read"])
    assert len(report["latents"]) == 128

    # recompute from the library on the same rows: labels, latents, the chosen latents' test figures
    nc = load_nanochat(nanochat_current_dir, device="cpu", dtype=torch.float32)
    val = list_shards(tiny_shards_dir)[1]
    tokens = val_shard_tokens(val, nc.tokenizer, 64, 47)
    assert torch.equal(torch.stack(tokens.rows), torch.cat(list(val_batches(val, nc.tokenizer, 64, 47, 8))))
    sae = load_sae(probe_sae)
    split = split_documents(tokens.doc, 0.2, 42)
    flat = torch.cat(tokens.rows)
    with torch.no_grad():
        x = nc.model.run_with_cache(torch.stack(tokens.rows), [HOOK])[HOOK].flatten(0, 1)
        f = sae.encode(x)
    f[flat == nc.tokenizer.bos_id] = 0
    sparse, _ = encode_positions(nc.model, sae, HOOK, tokens.rows, 8, nc.tokenizer.bos_id, np.zeros(0, np.int64),
                                 "cpu")
    assert torch.equal(sparse.pos, SparseLatents.from_dense(f).pos)
    probed = 0
    for j, name in enumerate(tokens.concepts):
        entry = report["concepts"][name]
        y, known = tokens.labels[:, j], tokens.known[:, j]
        test = known & split.test
        assert entry["tokens"]["test"] == {"labelled": int(test.sum()), "positive": int((y & test).sum())}
        if "skipped" in entry:
            continue
        probed += 1
        for rule in ("fires", "threshold", "upper_bound"):
            best = entry[f"best_latent_{rule}"]
            pred = (f[:, best["latent"]] > best["threshold"]).numpy()
            tp, fp, fn = int((pred & y & test).sum()), int((pred & ~y & test).sum()), int((~pred & y & test).sum())
            assert (best["test"]["tp"], best["test"]["fp"], best["test"]["fn"]) == (tp, fp, fn), (name, rule)
        # every "activation > t" of every latent is one of the thresholds swept on the test documents
        assert entry["best_latent_upper_bound"]["test"]["f1"] >= max(entry[f"best_latent_{r}"]["test"]["f1"]
                                                                     for r in ("fires", "threshold"))
        sp = entry["sparse_probing"]
        assert list(sp["sae_top_k"]) == ["1", "2", "5", "10", "20"] and sp["raw"]["d"] == 64
        assert 0 <= sp["sae_top_k"]["20"]["test_accuracy"] <= 1 and len(sp["sae_top_k"]["5"]["latents"]) == 5
    assert probed >= 6

    # a concept's figures do not depend on the others probed with it
    argv[argv.index("--out") + 1] = str(tmp_path / "two.json")
    assert main(argv + ["--concepts", "identifier", "comment"]) == 0
    two = json.loads((tmp_path / "two.json").read_text())
    assert list(two["concepts"]) == ["identifier", "comment"]
    assert all(two["concepts"][c] == report["concepts"][c] for c in two["concepts"])


def test_probe_cli_with_a_label_file(tmp_path, probe_sae, nanochat_current_dir, capsys):
    path = tmp_path / "digits.jsonl"
    with path.open("w") as f:
        for i in range(12):
            text = f"Step {i} of the model reads {i * 7} tokens and {i + 3} latents."
            spans = [[m, m + 1] for m, ch in enumerate(text) if ch.isdigit()]
            f.write(json.dumps({"text": text, "labels": {"digit": spans}}) + "\n")
    out = tmp_path / "probe.json"
    argv = ["probe", "--sae", str(probe_sae), "--model", str(nanochat_current_dir), "--labels", str(path),
            "--device", "cpu", "--out", str(out), "--k", "1", "2"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert list(report["concepts"]) == ["digit"] and report["labels"] == str(path) and "data" not in report
    assert report["documents"] == {"read": 12, "user": 12}
    assert report["tokens_read"] == report["tokens_labelled"] + 12  # every token but the 12 BOS, last row kept
    assert list(report["concepts"]["digit"]["sparse_probing"]["sae_top_k"]) == ["1", "2"]
    assert "digit" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--concepts", "strings"], "--concepts 'strings' is not a concept of this text; choose from string, docstring"),
    (["--labels", "LABELS"], "--labels gives the text to probe, so --data has nothing to do"),
    (["--k", "0"], "must be one or more numbers of latents >= 1"),
    (["--k", "500"], "more than the SAE's 128 latents"),
    (["--test-fraction", "1.5"], "must be between 0 and 1"),
])
def test_probe_cli_bad_input_exits_2_and_writes_nothing(tmp_path, probe_sae, nanochat_current_dir, tiny_shards_dir,
                                                        capsys, extra, message):
    out = tmp_path / "probe.json"
    (tmp_path / "l.jsonl").write_text('{"text": "a", "labels": {"x": [[0, 1]]}}\n')
    extra = [str(tmp_path / "l.jsonl") if a == "LABELS" else a for a in extra]
    argv = ["probe", "--sae", str(probe_sae), "--model", str(nanochat_current_dir), "--data", str(tiny_shards_dir),
            "--tokens", "500", "--device", "cpu", "--out", str(out), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_probe_cli_label_file_errors(tmp_path, probe_sae, nanochat_current_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ab", "labels": {"x": [[0, 1]]}}\n{"text": "ab", "labels": {"x": [[1, 5]]}}\n')
    out = tmp_path / "probe.json"
    argv = ["probe", "--sae", str(probe_sae), "--model", str(nanochat_current_dir), "--labels", str(bad),
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 2: span [1, 5] of 'x' is not within the text's 2 characters" in err[0]
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "just one document", "labels": {"x": [[0, 4]]}}\n')
    argv[argv.index(str(bad))] = str(one)
    assert main(argv) == 2
    assert "holds 1 document(s); the train/test split is by document" in capsys.readouterr().err
    assert not out.exists()


def test_probe_print_config_round_trips(capsys):
    assert main(["probe", "--sae", "a", "--k", "1", "5", "--concepts", "string", "comment", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["k"] == [1, 5] and printed["concepts"] == ["string", "comment"] and printed["tokens"] == 100_000


def test_viz_shows_each_latents_best_matching_concept(tmp_path, probe_sae, nanochat_current_dir, tiny_shards_dir,
                                                      capsys):
    common = ["--sae", str(probe_sae), "--model", str(nanochat_current_dir), "--data", str(tiny_shards_dir),
              "--device", "cpu"]
    report = tmp_path / "probe.json"
    assert main(["probe", *common, "--tokens", "1500", "--train-size", "100", "--test-size", "50", "--k", "1",
                 "--out", str(report)]) == 0
    latents = json.loads(report.read_text())["latents"]
    site = tmp_path / "site"
    assert main(["viz", *common, "--tokens", "300", "--features", "0-5", "--out", str(site), "--probe",
                 str(report)]) == 0
    shown = 0
    for i in range(6):
        page = (site / "features" / f"{i}.html").read_text()
        if latents[i] is None:
            assert "best-matching concept" not in page
            continue
        shown += 1
        assert "best-matching concept" in page and f"{latents[i]['concept']}: F1 " in page
    assert shown > 0
    # a report of another SAE is refused before any work, and the site stays as it was
    other = json.loads(report.read_text())
    other["latents"] = other["latents"][:-1]
    (tmp_path / "other.json").write_text(json.dumps(other))
    before = (site / "index.html").read_bytes()
    capsys.readouterr()
    assert main(["viz", *common, "--tokens", "300", "--out", str(site), "--probe", str(tmp_path / "other.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "with 127 latents, not this one at blocks.1.hook_resid_post with 128" in err[0]
    assert (site / "index.html").read_bytes() == before
