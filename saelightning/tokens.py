"""The one token packer: documents → BOS-prefixed token ids → rows of `context` tokens → batches of rows.

As nanochat packs its pretraining data: each document is encoded with BOS in front, the documents
are concatenated and the stream is cut into rows of `context` tokens (a document may continue into
the next row). Every part of saelightning reads tokens through here, so the same text gives the same
rows everywhere:
- training: `TokenBatches` over the train shards (looping, striped over ranks and DataLoader
  workers, resumable exactly), in batches of `data.model_batch_rows` rows;
- validation, `saelightning eval`, `viz` and `neuronpedia`: `val_batches`, the first rows of the
  val shard (the last one) in file order, unshuffled: `data.val_batches` x `data.model_batch_rows`
  rows in validation, ceil(--tokens / context) rows in the commands;
- `saelightning cache`: `TokenBatches` with one reader, as a single-process fit reads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from saelightning.errors import SAELightningError
from saelightning.nanochat.shards import TextStream


class Packer:
    """Cuts BOS-prefixed documents into rows of `context` tokens; `carry` is the start of the next row."""

    def __init__(self, tokenizer, context: int, carry: Iterable[int] = ()):
        if context < 1:
            raise SAELightningError(f"context size {context} must be >= 1")
        self.tokenizer, self.context, self.carry = tokenizer, context, list(carry)

    def rows(self, docs: Iterator[str], n: int) -> list[list[int]]:
        """The next n rows, fewer when `docs` runs out (a partial last row stays in carry)."""
        need = n * self.context
        while len(self.carry) < need:
            doc = next(docs, None)
            if doc is None:
                break
            self.carry.extend(self.tokenizer.encode(doc, prepend_bos=True))
        k = min(n, len(self.carry) // self.context)
        rows = [self.carry[i * self.context:(i + 1) * self.context] for i in range(k)]
        del self.carry[:k * self.context]
        return rows


class TokenBatches(IterableDataset):
    """Training token batches: {"tokens": LongTensor[rows, context], "worker": id, "state": position after it}.

    The documents come from a looping TextStream (each reader its own row groups); the state (the stream's
    position and the packer's carry) lets a reader resume at exactly the next batch.
    """

    def __init__(self, paths, tokenizer, context_size: int, rows: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start: dict | None = None):
        self.tokenizer, self.context_size, self.rows = tokenizer, context_size, rows
        self.stream = TextStream(paths, rank=rank, world_size=world_size, seed=seed, loop=True)
        self.carry: dict[int, list[int]] = {}
        if start and start.get("workers"):
            workers = start["workers"]
            self.stream.load_state_dict(TextStream.merge_states(w["stream"] for w in workers.values()))
            self.carry = {int(k): list(w["carry"]) for k, w in workers.items()}

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        packer = Packer(self.tokenizer, self.context_size, self.carry.get(worker, []))
        docs = iter(self.stream)  # loops forever; it raises when a whole pass of its row groups has no text
        while True:
            rows = packer.rows(docs, self.rows)
            state = {"stream": self.stream.state_dict(), "carry": list(packer.carry)}
            yield {"tokens": torch.tensor(rows, dtype=torch.long), "worker": worker, "state": state}


def rows_for_tokens(n_tokens: int, context: int) -> int:
    """How many rows --tokens N means: enough to hold N positions (BOS included)."""
    return max(1, math.ceil(n_tokens / context))


def val_batches(val_shard: Path, tokenizer, context: int, n_rows: int, batch_rows: int,
                rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
    """The first n_rows rows of the val shard, in file order, as batches [<= batch_rows, context].

    Under DDP each rank takes batches rank, rank + world_size, ... of the same sequence, so the ranks
    together read exactly the rows one process reads. Fewer rows come when the shard runs out.
    """
    if n_rows < 1 or batch_rows < 1:
        raise SAELightningError(f"need >= 1 val rows and rows per batch, got {n_rows} and {batch_rows}")
    docs = iter(TextStream([val_shard], loop=False, shuffle=False))
    packer, left, index = Packer(tokenizer, context), n_rows, 0
    while left > 0:
        rows = packer.rows(docs, min(batch_rows, left))
        if not rows:
            return
        if index % world_size == rank:
            yield torch.tensor(rows, dtype=torch.long)
        left, index = left - len(rows), index + 1
        if len(rows) < batch_rows and left > 0:  # the shard ran out
            return
