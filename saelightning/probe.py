"""`saelightning probe`: do an SAE's latents isolate real concepts?

Every token of the text is labelled with concepts (saelightning.labels: Python's own tokenize and ast on
the val shard's Python source, or a user file of character spans), the model and the SAE read the text,
and per concept (one binary task each):

- sparse probing, as SAEBench defines it: balanced classes (as many negatives as positives, sampled),
  held-out test documents; latents ranked by |mean over positives - mean over negatives| on the train
  sample; an L2 logistic regression (C = 1, with intercept: sklearn's objective, solved by Newton's
  method to convergence) on the top k latents, k = 1, 2, 5, 10, 20; test accuracy and F1. The baseline is
  the same probe on the raw activations at the SAE's hook point: all of its channels, and its top k
  channels ranked the same way (SAEBench's llm_top_k).
- the best single latent, on the natural (unbalanced) distribution of labelled tokens: chosen on the
  train documents, reported on the test documents, by two rules: "fires" (activation > 0) and the best
  threshold (activation > t, t one of the latent's train activations or 0), with precision, recall, F1;
  and an upper bound, the best latent and threshold chosen on the test documents themselves.

The split is by document (neighbouring tokens of one document are alike: a split by token would leak):
a seeded fifth of the documents (--test_fraction) are the test documents. Rows are read as eval reads
them (the first ceil(tokens / context) rows of the val shard, in file order); a user file is packed the
same way, its last partial row kept.
"""

from __future__ import annotations

import json
import math
import sys
import zlib
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from saelightning import resolve
from saelightning.atomic import write_json
from saelightning.command import parse
from saelightning.demo import MANIFEST, stdlib_files
from saelightning.errors import SAELightningError
from saelightning.evaluate import check_saes
from saelightning.export import load_sae
from saelightning.labels import (
    CONCEPTS,
    PYTHON_CONCEPTS,
    SourceIndex,
    label_python_documents,
    read_label_file,
    span_char_labels,
    token_char_spans,
    token_labels,
)
from saelightning.nanochat.shards import TextStream
from saelightning.progress import progress_bar
from saelightning.tokens import rows_for_tokens

MAX_ENTRIES = 2**27  # non-zero latents kept in memory (20 bytes each: 2.5 GiB)


# ---------------------------------------------------------------------------------------------
# Labelled token rows


@dataclass
class LabelledTokens:
    """Token rows with per-position labels; a position is an index into the rows laid end to end."""

    rows: list[torch.Tensor]  # LongTensor [T] each: context tokens (a user file's last row may be shorter)
    doc: np.ndarray  # [N] the document each position belongs to
    labels: np.ndarray  # [N, C] bool
    known: np.ndarray  # [N, C] bool: labelled for that concept (never at BOS)
    concepts: list[str]
    statuses: list[str]  # per document read: how it was labelled (labels.CharLabels.status)


def token_lengths(tokenizer) -> np.ndarray:
    """UTF-8 byte length of every token id (specials: their text's)."""
    enc = tokenizer.encoding
    return np.array([len(enc.decode_single_token_bytes(i)) for i in range(tokenizer.vocab_size)], dtype=np.int64)


def pack_labelled(docs: Sequence[list[int]], doc_labels: Sequence[tuple[np.ndarray, np.ndarray]], context: int,
                  n_rows: int, keep_partial: bool = False) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray,
                                                                    np.ndarray]:
    """Documents (token ids, BOS first) with their token labels laid end to end and cut into rows of
    `context` tokens, as tokens.Packer cuts them: the first n_rows full rows (and, with keep_partial, a
    shorter last row when the documents end first). Returns (rows, doc index, labels, known) per position."""
    ids = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs])
    doc = np.concatenate([np.full(len(d), i, dtype=np.int64) for i, d in enumerate(docs)])
    labels = np.concatenate([lab for lab, _ in doc_labels])
    known = np.concatenate([kn for _, kn in doc_labels])
    full = min(n_rows, len(ids) // context)
    n = full * context
    rows = list(torch.from_numpy(ids[:n]).view(full, context)) if full else []
    if keep_partial and full < n_rows and len(ids) > n:
        rows.append(torch.from_numpy(ids[n:]))
        n = len(ids)
    return rows, doc[:n], labels[:n], known[:n]


def _with_bos(labels: np.ndarray, known: np.ndarray, n_concepts: int) -> tuple[np.ndarray, np.ndarray]:
    """A document's token labels with the BOS position (never labelled) in front; known made [T, C]."""
    if known.ndim == 1:
        known = np.repeat(known[:, None], n_concepts, axis=1)
    pad = np.zeros((1, n_concepts), dtype=bool)
    return np.concatenate([pad, labels]), np.concatenate([pad, known])


def _label_tokens(texts, char_labels, tokenizer, lengths) -> tuple[list[list[int]], list]:
    ids, out = [], []
    for text, chars in zip(texts, char_labels):
        doc = tokenizer.encode(text, prepend_bos=True)
        first, end = token_char_spans(text, lengths, doc[1:])
        labels, known = token_labels(chars, first, end)
        ids.append(doc)
        out.append(_with_bos(labels, known, chars.labels.shape[1]))
    return ids, out


def python_sources(data_dir: Path) -> SourceIndex | None:
    """The standard library's files for the demo shards (their manifest names the stdlib they were cut from)."""
    try:
        manifest = json.loads((Path(data_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    root = manifest.get("stdlib") if isinstance(manifest, dict) else None
    return SourceIndex(stdlib_files(root)) if root and Path(root).is_dir() else None


def val_shard_tokens(val_shard: Path, tokenizer, context: int, n_rows: int,
                     sources: SourceIndex | None = None) -> LabelledTokens:
    """The first n_rows rows of the val shard (as eval reads them), with every token's Python labels."""
    texts, need, total = [], n_rows * context, 0
    for text in TextStream([val_shard], loop=False, shuffle=False):
        texts.append(text)
        total += len(tokenizer.encode(text, prepend_bos=True))
        if total >= need:
            break
    located = sources.locate(texts) if sources is not None else None
    chars = label_python_documents(texts, located)
    ids, labels = _label_tokens(texts, chars, tokenizer, token_lengths(tokenizer))
    rows, doc, lab, known = pack_labelled(ids, labels, context, n_rows)
    n_docs = int(doc.max()) + 1 if len(doc) else 0
    return LabelledTokens(rows, doc, lab, known, list(PYTHON_CONCEPTS), [c.status for c in chars[:n_docs]])


def label_file_tokens(path, tokenizer, context: int, n_rows: int) -> LabelledTokens:
    """A user label file's documents as token rows with their labels (read_label_file's format)."""
    texts, spans, concepts = read_label_file(path)
    chars = [span_char_labels(t, s, concepts) for t, s in zip(texts, spans)]
    ids, labels = _label_tokens(texts, chars, tokenizer, token_lengths(tokenizer))
    rows, doc, lab, known = pack_labelled(ids, labels, context, n_rows, keep_partial=True)
    n_docs = int(doc.max()) + 1 if len(doc) else 0
    return LabelledTokens(rows, doc, lab, known, concepts, [c.status for c in chars[:n_docs]])


# ---------------------------------------------------------------------------------------------
# Latents of every position, kept sparse


@dataclass
class SparseLatents:
    """The non-zero latents of n_positions positions: entry e is latent[e] at position pos[e], value[e]."""

    pos: torch.Tensor  # int64 [E]
    latent: torch.Tensor  # int64 [E]
    value: torch.Tensor  # float32 [E]
    n_positions: int
    d_sae: int

    @classmethod
    def from_dense(cls, f: torch.Tensor) -> SparseLatents:
        pos, latent = torch.nonzero(f, as_tuple=True)
        return cls(pos, latent, f[pos, latent].float(), f.shape[0], f.shape[1])


def _batches(rows: list[torch.Tensor], batch_rows: int):
    """Consecutive rows of one length, batch_rows at a time, with the position of their first token."""
    start, i = 0, 0
    while i < len(rows):
        j = i + 1
        while j < len(rows) and j - i < batch_rows and len(rows[j]) == len(rows[i]):
            j += 1
        batch = torch.stack(rows[i:j])
        yield start, batch
        start, i = start + batch.numel(), j


@torch.inference_mode()
def encode_positions(model, sae, hook: str, rows: list[torch.Tensor], batch_rows: int, bos_id: int,
                     keep: np.ndarray, device, bar=None) -> tuple[SparseLatents, torch.Tensor]:
    """Run the model and the SAE over the rows: (the SAE's non-zero latents at every non-BOS position, the raw
    activations [len(keep), d_in] at the positions `keep` (sorted), in that order)."""
    keep_t = torch.as_tensor(keep, dtype=torch.long)
    parts, raws, entries, n = [], [], 0, 0
    for start, idx in _batches(rows, batch_rows):
        idx = idx.to(device)
        x = model.run_with_cache(idx, [hook])[hook].flatten(0, 1)
        f = sae.encode(x.to(sae.W_dec.dtype)).float()
        f[idx.flatten() == bos_id] = 0
        pos, latent = torch.nonzero(f, as_tuple=True)
        entries += len(pos)
        if entries > MAX_ENTRIES:
            raise SAELightningError(f"the SAE's non-zero latents over these tokens pass {MAX_ENTRIES} "
                                    f"({MAX_ENTRIES * 20 / 2**30:.1f} GiB in memory); lower --tokens")
        parts.append((pos.cpu() + start, latent.cpu(), f[pos, latent].cpu()))
        lo, hi = torch.searchsorted(keep_t, torch.tensor([start, start + idx.numel()]))
        raws.append(x[(keep_t[lo:hi] - start).to(device)].float().cpu())
        n = start + idx.numel()
        if bar is not None:
            bar.update(idx.numel())
    d_sae = sae.W_dec.shape[0]
    if not parts:
        return SparseLatents(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0), 0,
                             d_sae), torch.zeros(0, sae.W_dec.shape[1])
    pos, latent, value = (torch.cat(p) for p in zip(*parts))
    return SparseLatents(pos, latent, value, n, d_sae), torch.cat(raws)


# ---------------------------------------------------------------------------------------------
# The metrics (each checked against a hand computation in tests/test_probe.py)


def binary_scores(pred: torch.Tensor, y: torch.Tensor) -> dict:
    """Accuracy, precision, recall and F1 of the positive class, with the counts. Precision is 0 when
    nothing is predicted positive, recall 0 without positives; F1 = 2 tp / (2 tp + fp + fn), 0 when 0/0."""
    pred, y = pred.bool(), y.bool()
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    return _scores(tp, fp, fn, tn)


def _scores(tp: int, fp: int, fn: int, tn: int | None = None) -> dict:
    out = {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
           "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0, "tp": tp, "fp": fp, "fn": fn}
    if tn is not None:
        out = {"accuracy": (tp + tn) / max(tp + fp + fn + tn, 1), **out, "tn": tn}
    return out


def class_means(sparse: SparseLatents, positions: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of every latent over the positive and over the negative positions of a sample ([d_sae] float64
    each); positions: distinct positions, y: their labels."""
    row = torch.full((sparse.n_positions,), -1, dtype=torch.long)
    row[positions] = torch.arange(len(positions))
    r = row[sparse.pos]
    sel = r >= 0
    lab = y.bool()[r[sel]]
    lat, val = sparse.latent[sel], sparse.value[sel].double()
    sums = [torch.zeros(sparse.d_sae, dtype=torch.float64).index_add_(0, lat[m], val[m]) for m in (lab, ~lab)]
    counts = [max(int(y.bool().sum()), 1), max(int((~y.bool()).sum()), 1)]
    return sums[0] / counts[0], sums[1] / counts[1]


def rank_by_mean_difference(mean_pos: torch.Tensor, mean_neg: torch.Tensor) -> torch.Tensor:
    """Indices by |mean_pos - mean_neg|, largest first (ties: lower index first), as SAEBench ranks latents."""
    return torch.sort((mean_pos - mean_neg).abs(), descending=True, stable=True).indices


def dense_columns(sparse: SparseLatents, positions: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """[len(positions), len(latents)] float64: those latents at those (distinct) positions."""
    row = torch.full((sparse.n_positions,), -1, dtype=torch.long)
    row[positions] = torch.arange(len(positions))
    col = torch.full((sparse.d_sae,), -1, dtype=torch.long)
    col[latents] = torch.arange(len(latents))
    r, c = row[sparse.pos], col[sparse.latent]
    sel = (r >= 0) & (c >= 0)
    out = torch.zeros(len(positions), len(latents), dtype=torch.float64)
    out[r[sel], c[sel]] = sparse.value[sel].double()
    return out


def fit_logistic(X: torch.Tensor, y: torch.Tensor, C: float = 1.0, max_iter: int = 100,
                 tol: float = 1e-9) -> tuple[torch.Tensor, float]:
    """L2-regularised logistic regression with an unpenalised intercept, sklearn's objective
    0.5 |w|^2 + C * sum_i log(1 + exp(-s_i (w.x_i + b))), s_i = +-1, minimised by Newton's method with a
    backtracking line search (float64). Returns (w, b)."""
    X = X.double()
    n, d = X.shape
    Xb = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)
    t = y.double()
    reg = torch.ones(d + 1, dtype=torch.float64)
    reg[-1] = 0.0
    w = torch.zeros(d + 1, dtype=torch.float64)

    def objective(v):
        z = Xb @ v
        return float(C * (torch.nn.functional.softplus(z) - t * z).sum() + 0.5 * (reg * v * v).sum())

    value = objective(w)
    for _ in range(max_iter):
        z = Xb @ w
        p = torch.sigmoid(z)
        grad = C * (Xb.T @ (p - t)) + reg * w
        if float(grad.abs().max()) <= tol * max(1.0, C * n):
            break
        hess = C * (Xb.T * (p * (1 - p))) @ Xb + torch.diag(reg)
        hess.diagonal().add_(1e-10 * (1.0 + float(hess.diagonal().abs().max())))  # the intercept's curvature can vanish
        step = torch.linalg.solve(hess, grad)
        slope, scale = float(grad @ step), 1.0
        while scale > 1e-10:
            trial = objective(w - scale * step)
            if trial <= value - 1e-4 * scale * slope:
                break
            scale /= 2
        else:
            break
        w, value = w - scale * step, trial
    return w[:-1], float(w[-1])


def logistic_predict(X: torch.Tensor, w: torch.Tensor, b: float) -> torch.Tensor:
    return (X.double() @ w + b) > 0


def threshold_sweep(sparse: SparseLatents, y: torch.Tensor, mask: torch.Tensor):
    """Every latent's best threshold as a one-latent classifier "activation > t" over the positions in mask
    (bool [n_positions]) with labels y: t runs over 0 and the latent's activations there. Returns per latent
    (F1, t, tp, fp) [d_sae] each (ties: the higher t), and the number of positives. A latent that never fires
    there has F1 0 at t = 0."""
    y, mask = y.bool(), mask.bool()
    positives = int((y & mask).sum())
    sel = mask[sparse.pos]
    lat, val, lab = sparse.latent[sel], sparse.value[sel], y[sparse.pos[sel]]
    order = torch.sort(val, descending=True, stable=True).indices
    order = order[torch.sort(lat[order], stable=True).indices]  # by latent, then by value (largest first)
    lat, val, lab = lat[order], val[order], lab[order].long()
    d = sparse.d_sae
    best_f1, best_t = torch.zeros(d, dtype=torch.float64), torch.zeros(d)
    best_tp, best_fp = torch.zeros(d, dtype=torch.long), torch.zeros(d, dtype=torch.long)
    if len(lat) == 0:
        return best_f1, best_t, best_tp, best_fp, positives
    counts = torch.bincount(lat, minlength=d)
    group_start = torch.cumsum(counts, 0) - counts
    tp_all, fp_all = torch.cumsum(lab, 0), torch.cumsum(1 - lab, 0)
    before = group_start[lat] - 1  # the index before this latent's group (-1 for the first)
    tp_before = torch.where(before >= 0, tp_all[before.clamp(min=0)], 0)
    fp_before = torch.where(before >= 0, fp_all[before.clamp(min=0)], 0)
    tp, fp = tp_all - tp_before, fp_all - fp_before
    last = torch.ones(len(lat), dtype=torch.bool)  # the last entry of a run of equal (latent, value)
    last[:-1] = (lat[1:] != lat[:-1]) | (val[1:] != val[:-1])
    next_val = torch.zeros(len(lat))
    same = torch.zeros(len(lat), dtype=torch.bool)
    same[:-1] = lat[1:] == lat[:-1]
    next_val[:-1] = torch.where(same[:-1], val[1:], 0.0)  # predict > the next smaller value (0 after the last)
    f1 = (2 * tp).double() / (tp + fp + positives).clamp(min=1).double()
    f1 = torch.where(last, f1, -1.0)
    top = torch.full((d,), -1.0, dtype=torch.float64).scatter_reduce(0, lat, f1, "amax")
    index = torch.arange(len(lat))
    first = torch.full((d,), len(lat), dtype=torch.long).scatter_reduce(
        0, lat, torch.where(last & (f1 == top[lat]), index, len(lat)), "amin")
    hit = first < len(lat)
    at = first[hit]
    best_f1[hit], best_t[hit], best_tp[hit], best_fp[hit] = f1[at].clamp(min=0), next_val[at], tp[at], fp[at]
    return best_f1, best_t, best_tp, best_fp, positives


def counts_above(sparse: SparseLatents, y: torch.Tensor, mask: torch.Tensor, thresholds: torch.Tensor):
    """Per latent, (tp, fp) [d_sae] of "activation > thresholds[latent]" over the positions in mask."""
    sel = mask.bool()[sparse.pos] & (sparse.value > thresholds[sparse.latent])
    lab = y.bool()[sparse.pos[sel]]
    lat = sparse.latent[sel]
    return (torch.bincount(lat[lab], minlength=sparse.d_sae), torch.bincount(lat[~lab], minlength=sparse.d_sae))


# ---------------------------------------------------------------------------------------------
# Per concept


@dataclass
class Split:
    """Which positions are train / test (by document), and each concept's balanced samples."""

    train: np.ndarray  # bool [N]
    test: np.ndarray
    train_docs: int
    test_docs: int


def split_documents(doc: np.ndarray, test_fraction: float, seed: int) -> Split:
    """A seeded test_fraction of the documents (at least one, and at least one left to train on)."""
    docs = np.unique(doc)
    if len(docs) < 2:
        raise SAELightningError(f"the text read holds {len(docs)} document(s); the train/test split is by document, "
                                "so give at least 2 (more --tokens, or more documents in --labels)")
    n_test = min(max(1, round(test_fraction * len(docs))), len(docs) - 1)
    test_docs = np.random.default_rng(seed).permutation(docs)[:n_test]
    test = np.isin(doc, test_docs)
    return Split(~test, test, len(docs) - n_test, n_test)


def balanced_sample(y: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Positions in mask: min(#positives, #negatives, size // 2) of each class, drawn without replacement, sorted."""
    pos, neg = np.flatnonzero(mask & y), np.flatnonzero(mask & ~y)
    n = min(len(pos), len(neg), size // 2)
    return np.sort(np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)]))


@dataclass
class ProbeSettings:
    ks: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20])
    train_size: int = 4000
    test_size: int = 1000
    C: float = 1.0
    seed: int = 42


@dataclass
class Sample:
    """A concept's balanced train and test samples (positions), its token counts, or why it is skipped."""

    train: np.ndarray
    test: np.ndarray
    counts: dict[str, dict[str, int]]  # {"train" / "test": {"labelled": n, "positive": p}}
    skipped: str | None = None


def concept_samples(data: LabelledTokens, split: Split, settings: ProbeSettings) -> dict[str, Sample]:
    """Per concept, the balanced samples of the train and test documents (seeded by the seed and the concept's
    name, so a concept's samples do not depend on which others are probed), or why it is skipped."""
    out = {}
    for j, name in enumerate(data.concepts):
        y, known = data.labels[:, j], data.known[:, j]
        counts = {part: {"labelled": int((known & mask).sum()), "positive": int((known & mask & y).sum())}
                  for part, mask in (("train", split.train), ("test", split.test))}
        empty = [f"no {cls} in the {part} documents" for part, c in counts.items()
                 for cls, n in (("positive", c["positive"]), ("negative", c["labelled"] - c["positive"])) if n == 0]
        if empty:
            out[name] = Sample(np.zeros(0, np.int64), np.zeros(0, np.int64), counts, "; ".join(empty))
            continue
        rng = np.random.default_rng([settings.seed, zlib.crc32(name.encode("utf-8"))])
        out[name] = Sample(balanced_sample(y, known & split.train, settings.train_size, rng),
                           balanced_sample(y, known & split.test, settings.test_size, rng), counts)
    return out


def _fit_and_score(X_train, y_train, X_test, y_test, C) -> dict:
    w, b = fit_logistic(X_train, y_train, C)
    s = binary_scores(logistic_predict(X_test, w, b), y_test)
    return {"test_accuracy": s["accuracy"], "test_f1": s["f1"]}


def probe_concept(j: int, data: LabelledTokens, split: Split, sample: Sample, sparse: SparseLatents,
                  raw: torch.Tensor, raw_positions: np.ndarray, settings: ProbeSettings) -> dict:
    """One concept's sparse probing and best single latents (see the module docstring)."""
    train_pos, test_pos = sample.train, sample.test
    y_all = torch.from_numpy(data.labels[:, j])
    known = torch.from_numpy(data.known[:, j])
    entry = {"tokens": sample.counts}
    tr, te = torch.from_numpy(train_pos), torch.from_numpy(test_pos)
    y_tr, y_te = y_all[tr], y_all[te]
    ks = [k for k in settings.ks if k <= sparse.d_sae]
    ranking = rank_by_mean_difference(*class_means(sparse, tr, y_tr))[:max(ks)]
    X_tr, X_te = dense_columns(sparse, tr, ranking), dense_columns(sparse, te, ranking)
    sae = {str(k): {**_fit_and_score(X_tr[:, :k], y_tr, X_te[:, :k], y_te, settings.C),
                    "latents": ranking[:k].tolist()} for k in ks}
    R_tr = raw[np.searchsorted(raw_positions, train_pos)].double()
    R_te = raw[np.searchsorted(raw_positions, test_pos)].double()
    channels = rank_by_mean_difference(R_tr[y_tr].mean(0), R_tr[~y_tr].mean(0))
    raw_top = {str(k): {**_fit_and_score(R_tr[:, channels[:k]], y_tr, R_te[:, channels[:k]], y_te, settings.C),
                        "channels": channels[:k].tolist()} for k in settings.ks if k <= R_tr.shape[1]}
    entry["sparse_probing"] = {"train_size": len(train_pos), "test_size": len(test_pos), "sae_top_k": sae,
                               "raw": {**_fit_and_score(R_tr, y_tr, R_te, y_te, settings.C), "d": R_tr.shape[1]},
                               "raw_top_k": raw_top}
    train_mask = known & torch.from_numpy(split.train)
    test_mask = known & torch.from_numpy(split.test)
    f1, thresholds, _, _, _ = threshold_sweep(sparse, y_all, train_mask)
    fires_tp, fires_fp = counts_above(sparse, y_all, train_mask, torch.zeros(sparse.d_sae))
    p_train = int((y_all & train_mask).sum())
    fires_f1 = (2 * fires_tp).double() / (fires_tp + fires_fp + p_train).clamp(min=1)
    for rule, scores, t in (("fires", fires_f1, torch.zeros(sparse.d_sae)), ("threshold", f1, thresholds)):
        latent = int(torch.argmax(scores))  # ties: the lowest latent index
        tp, fp = counts_above(sparse, y_all, test_mask, t)
        p_test = int((y_all & test_mask).sum())
        entry[f"best_latent_{rule}"] = {"latent": latent, "threshold": float(t[latent]),
                                        "train_f1": float(scores[latent]),
                                        "test": _scores(int(tp[latent]), int(fp[latent]), p_test - int(tp[latent]))}
    # chosen on the test documents themselves: no single latent and threshold does better there
    f1, thresholds, tp, fp, p_test = threshold_sweep(sparse, y_all, test_mask)
    latent = int(torch.argmax(f1))
    entry["best_latent_upper_bound"] = {"latent": latent, "threshold": float(thresholds[latent]),
                                        "test": _scores(int(tp[latent]), int(fp[latent]), p_test - int(tp[latent]))}
    return entry


def latent_concepts(data: LabelledTokens, sparse: SparseLatents) -> list[dict | None]:
    """Per latent, the concept it matches best as "fires => concept" over all labelled tokens (by F1; ties: the
    first concept), with its precision and recall; None for a latent that never fires on a labelled token."""
    best: list[dict | None] = [None] * sparse.d_sae
    best_f1 = torch.full((sparse.d_sae,), -1.0, dtype=torch.float64)
    for j, name in enumerate(data.concepts):
        y, known = torch.from_numpy(data.labels[:, j]), torch.from_numpy(data.known[:, j])
        tp, fp = counts_above(sparse, y, known, torch.zeros(sparse.d_sae))
        positives = int((y & known).sum())
        f1 = (2 * tp).double() / (tp + fp + positives).clamp(min=1)
        for i in torch.nonzero((tp + fp > 0) & (f1 > best_f1)).flatten().tolist():
            best_f1[i] = f1[i]
            s = _scores(int(tp[i]), int(fp[i]), positives - int(tp[i]))
            best[i] = {"concept": name, "precision": s["precision"], "recall": s["recall"], "f1": s["f1"]}
    return best


def read_latent_concepts(path, hook: str, d_sae: int) -> list[dict | None]:
    """The per-latent best-matching concepts of a `saelightning probe --out` report (report["latents"]), after
    checking that the report is about an SAE at this hook with d_sae latents."""
    path = Path(path).expanduser()
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SAELightningError(f"--probe {path} does not exist; write it with saelightning probe --out") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SAELightningError(f"--probe {path} is not a readable JSON report ({type(e).__name__}); write it again "
                                "with saelightning probe --out") from None
    latents = report.get("latents") if isinstance(report, dict) else None
    if not isinstance(latents, list) or not all(x is None or isinstance(x, dict) and "concept" in x for x in latents):
        raise SAELightningError(f"--probe {path} is not a saelightning probe report (no \"latents\" list); write it "
                                "with saelightning probe --out")
    if report.get("hook_name") != hook or len(latents) != d_sae:
        raise SAELightningError(f"--probe {path} is about an SAE at {report.get('hook_name')} with {len(latents)} "
                                f"latents, not this one at {hook} with {d_sae}; probe this SAE")
    return latents


# ---------------------------------------------------------------------------------------------
# `saelightning probe`


@dataclass
class ProbeArgs:
    """Probe an exported SAE's latents for concepts: sparse probing (SAEBench) on the top k latents against a probe
    on the raw activations, and each concept's best single latent (precision, recall, F1).

    Args:
        sae: exported SAE directory (SAELens layout).
        model: nanochat checkpoint or base dir, or "demo" (default: the one the SAE's cfg.json records).
        data: parquet shard dir (the last shard is val), or "demo" (default: the shards the SAE was trained on);
            its documents are labelled as Python (tokenize and ast). Not with --labels.
        labels: a JSONL file of labelled text instead of the val shard, one document per line:
            {"text": "...", "labels": {"concept": [[start, end], ...]}} with character offsets, end exclusive;
            a concept a line does not name has no positive there.
        concepts: the concepts to probe (default: all; the Python ones are string, docstring, comment, keyword,
            builtin, identifier, number, operator, bracket_depth_ge1, bracket_depth_ge2, function_body, class_body).
        tokens: token positions to read (the first ceil(tokens / context_size) rows, as eval).
        out: also write the report as JSON here (atomically); the table is printed either way.
        k: the numbers of top latents (and raw channels) to probe with.
        train_size: balanced train sample per concept (half positives), at most.
        test_size: balanced test sample per concept (half positives), at most.
        test_fraction: the share of documents held out for testing.
        C: inverse L2 strength of the logistic probes (sklearn's C; SAEBench uses 1).
        seed: seeds the document split and the samples.
        context_size: tokens per row (default: the SAE's training context, as eval).
        batch_size: rows per forward.
        device: cpu or cuda (default: cuda when there is a GPU).
        quiet: no progress bar (it shows only on a terminal in any case).
    """

    sae: str
    model: str | None = None
    data: str | None = None
    labels: str | None = None
    concepts: list[str] | None = None
    tokens: int = 100_000
    out: str | None = None
    k: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20])
    train_size: int = 4000
    test_size: int = 1000
    test_fraction: float = 0.2
    C: float = 1.0
    seed: int = 42
    context_size: int | None = None
    batch_size: int = 8
    device: str | None = None
    quiet: bool = False

    def __post_init__(self):
        if self.tokens < 2 or self.batch_size < 1:
            raise SAELightningError("--tokens must be >= 2 and --batch_size >= 1")
        if not self.k or min(self.k) < 1:
            raise SAELightningError(f"--k {self.k} must be one or more numbers of latents >= 1, e.g. --k 1 2 5 10 20")
        if self.train_size < 2 or self.test_size < 2:
            raise SAELightningError("--train_size and --test_size must be >= 2 (half positives, half negatives)")
        if not 0 < self.test_fraction < 1:
            raise SAELightningError(f"--test_fraction {self.test_fraction} must be between 0 and 1")
        if not (self.C > 0 and math.isfinite(self.C)):
            raise SAELightningError(f"--C {self.C} must be a finite number > 0")
        if self.labels is not None and self.data is not None:
            raise SAELightningError("--labels gives the text to probe, so --data has nothing to do; pass one of them")


def run_probe(args: ProbeArgs) -> dict:
    """The whole `saelightning probe` run: load, label, encode, probe; returns the report (written with --out)."""
    device = resolve.device(args.device)
    model, load, data = resolve.sources([args.sae], args.model, None if args.labels else args.data)
    nc = resolve.load_model(model, device=device, dtype=torch.float32, **load)
    sae = load_sae(args.sae, device=device).eval()
    hook = resolve.sae_hook(sae, args.sae)
    check_saes(nc.model, {hook: [sae]})
    d_sae = sae.W_dec.shape[0]
    if max(args.k) > d_sae:
        raise SAELightningError(f"--k {max(args.k)} is more than the SAE's {d_sae} latents; give smaller --k")
    seq_len = nc.model.config.sequence_len
    context = args.context_size or min(int(sae.metadata.get("context_size") or 256), seq_len)
    if not 2 <= context <= seq_len:
        raise SAELightningError(f"--context_size must be in [2, {seq_len}], got {context}")
    n_rows = rows_for_tokens(args.tokens, context)
    if args.labels:
        tokens = label_file_tokens(args.labels, nc.tokenizer, context, n_rows)
        source = {"labels": str(args.labels)}
    else:
        data_dir = resolve.data_dir(data, model)
        _, val = resolve.shards(data_dir)
        tokens = val_shard_tokens(val, nc.tokenizer, context, n_rows, python_sources(data_dir))
        source = {"data": str(data_dir), "val_shard": str(val)}
    tokens = _select(tokens, args.concepts)
    n = len(tokens.doc)
    if not tokens.known.any():
        raise SAELightningError(f"none of the {n} tokens read is labelled (no Python that tokenize and ast parse); "
                                "probe Python text, or give --labels FILE")
    settings = ProbeSettings(list(args.k), args.train_size, args.test_size, args.C, args.seed)
    split = split_documents(tokens.doc, args.test_fraction, args.seed)
    samples = concept_samples(tokens, split, settings)
    keep = np.unique(np.concatenate([np.zeros(0, np.int64)] + [p for s in samples.values() for p in (s.train, s.test)]))
    with progress_bar(n, "probe", quiet=args.quiet) as bar:
        sparse, raw = encode_positions(nc.model, sae, hook, tokens.rows, args.batch_size, nc.tokenizer.bos_id, keep,
                                       device, bar)
    concepts = {}
    with _one_thread():
        for j, name in enumerate(tokens.concepts):
            sample = samples[name]
            if sample.skipped:
                concepts[name] = {"tokens": sample.counts, "skipped": sample.skipped}
            else:
                concepts[name] = probe_concept(j, tokens, split, sample, sparse, raw, keep, settings)
            if name in CONCEPTS and not args.labels:
                concepts[name] = {"description": CONCEPTS[name], **concepts[name]}
        latents = latent_concepts(tokens, sparse)
    if n < args.tokens:
        print(f"saelightning probe: the text ran out after {n} of {args.tokens} tokens; the report covers those",
              file=sys.stderr)
    statuses = {s: tokens.statuses.count(s) for s in dict.fromkeys(tokens.statuses)}
    report = {"sae": str(args.sae), "hook_name": hook, "model": resolve.model_path(model), **source,
              "context_size": context, "tokens_requested": args.tokens, "tokens_read": n,
              "tokens_labelled": int(tokens.known.any(1).sum()), "documents": {"read": len(tokens.statuses),
                                                                                **statuses},
              "split": {"by": "document", "test_fraction": args.test_fraction, "seed": args.seed,
                        "train_documents": split.train_docs, "test_documents": split.test_docs},
              "probe": {"k": list(args.k), "train_size": args.train_size, "test_size": args.test_size,
                        "balanced": True, "C": args.C, "solver": "newton (float64, to convergence)"},
              "concepts": concepts, "latents": latents}
    if args.out:
        write_json(args.out, report, indent=1)
    return report


@contextmanager
def _one_thread():
    """The probes multiply small matrices: on one thread, as a second one costs more in waking up than it saves
    (tens of ms per product on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _select(tokens: LabelledTokens, concepts: list[str] | None) -> LabelledTokens:
    if not concepts:
        return tokens
    unknown = [c for c in concepts if c not in tokens.concepts]
    if unknown:
        raise SAELightningError(f"--concepts {unknown[0]!r} is not a concept of this text; choose from "
                                f"{', '.join(tokens.concepts)}")
    cols = [tokens.concepts.index(c) for c in dict.fromkeys(concepts)]
    return LabelledTokens(tokens.rows, tokens.doc, tokens.labels[:, cols], tokens.known[:, cols],
                          [tokens.concepts[c] for c in cols], tokens.statuses)


def format_table(report: dict) -> str:
    """One row per concept: the test share of positives, SAE top-k and raw probe accuracy, best single latents."""
    ks = [str(k) for k in report["probe"]["k"]]
    head = (f"{'concept':<18}{'pos%':>6} " + "".join(f"{'k=' + k:>7}" for k in ks) + f"{'raw':>7}  "
            + f"{'fires>0: latent   P     R     F1':<34}{'threshold: latent      t     P     R     F1':<45}max F1")
    lines = ["sparse probing: balanced test accuracy on the SAE's top k latents and on the raw activations",
             "best single latent, chosen on the train documents: test precision / recall / F1",
             "max F1: the best that any one latent and threshold reach on the test documents", head]
    for name, c in report["concepts"].items():
        t = c["tokens"]["test"]
        row = f"{name:<18}{100 * t['positive'] / max(t['labelled'], 1):>6.1f} "
        if "skipped" in c:
            lines.append(f"{row} skipped: {c['skipped']}")
            continue
        sp = c["sparse_probing"]
        row += "".join(f"{sp['sae_top_k'][k]['test_accuracy']:>7.3f}" if k in sp["sae_top_k"] else f"{'-':>7}"
                       for k in ks) + f"{sp['raw']['test_accuracy']:>7.3f}  "
        f, h, m = c["best_latent_fires"], c["best_latent_threshold"], c["best_latent_upper_bound"]
        row += f"{f['latent']:>14} " + " ".join(f"{f['test'][s]:5.2f}" for s in ("precision", "recall", "f1"))
        row += f"   {h['latent']:>15} {h['threshold']:6.2f} "
        row += " ".join(f"{h['test'][s]:5.2f}" for s in ("precision", "recall", "f1")) + f"  {m['test']['f1']:6.2f}"
        lines.append(row)
    docs = report["documents"]
    lines.append(f"{report['tokens_read']} tokens read, {report['tokens_labelled']} labelled; documents: "
                 + ", ".join(f"{v} {k}" for k, v in docs.items()) + "; split by document: "
                 + f"{report['split']['train_documents']} train / {report['split']['test_documents']} test")
    return "\n".join(lines)


def cli_main(argv: Sequence[str]) -> int:
    args = parse(ProbeArgs, argv, "saelightning probe")
    if args is None:
        return 0
    report = run_probe(args)
    print(format_table(report))
    if args.out:
        print(f"report written to {args.out}")
    return 0
