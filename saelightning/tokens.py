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

A `ChatMix` (data.chat, data.chat_fraction) mixes chat conversations, rendered in nanochat's conversation
format (tokenizer.render_conversation: <|bos|>, <|user_start|> ... <|assistant_end|>), into the documents: the
packer takes the next conversation instead of the next document whenever the conversations' share of the
tokens it has packed is below the fraction, so the mix is exact in tokens and needs no random state (at 1 it takes
conversations only). Training
reads the train conversations (each reader its own stride of a seeded permutation), validation the held-out ones
in order: every tenth conversation, the ones the demo's chat stage holds out of its fine-tuning.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from saelightning.errors import SAELightningError
from saelightning.nanochat.shards import TextStream

HELD_OUT_EVERY = 10  # conversation i is held out (validation) when i % 10 == 0


class ChatMix:
    """Rendered conversations (token ids, each starting with <|bos|>) and the share of the tokens they take."""

    def __init__(self, conversations: list[list[int]], fraction: float, source: str = ""):
        if not 0.0 <= fraction <= 1.0:
            raise SAELightningError(f"data.chat_fraction={fraction} must be in [0, 1] (the share of the tokens "
                                    "that are chat conversations)")
        if fraction > 0 and not conversations:
            raise SAELightningError(f"data.chat {source!r} holds no conversation; give a JSONL file of conversations")
        self.conversations, self.fraction, self.source = conversations, fraction, source

    @classmethod
    def render(cls, tokenizer, conversations: list[list[dict]], fraction: float, split: str, seed: int = 0,
               source: str = "") -> ChatMix:
        """The train split (every conversation but each tenth, permuted by seed) or the val split (each tenth,
        in order), rendered in nanochat's conversation format."""
        if split == "val":
            picked = conversations[::HELD_OUT_EVERY]
        else:
            train = [c for i, c in enumerate(conversations) if i % HELD_OUT_EVERY]
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
            picked = [train[i] for i in order]
        return cls([tokenizer.render_conversation(c)[0] for c in picked], fraction, source)

    def fingerprint(self) -> str:
        """What a resumed run must mix in the same way: the source, the fraction and the conversations' tokens."""
        digest = hashlib.sha256(repr((self.source, self.fraction)).encode())
        for ids in self.conversations:
            digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
        return digest.hexdigest()[:16]


class Packer:
    """Cuts BOS-prefixed documents into rows of `context` tokens; `carry` is the start of the next row.

    With a ChatMix, reader `reader` of `readers` takes conversations reader, reader + readers, ... (cycling) and
    `mixed` counts [conversations taken, chat tokens, all tokens] packed so far (part of its resumable state)."""

    def __init__(self, tokenizer, context: int, carry: Iterable[int] = (), chat: ChatMix | None = None,
                 mixed: Iterable[int] = (0, 0, 0), reader: int = 0, readers: int = 1):
        if context < 1:
            raise SAELightningError(f"context size {context} must be >= 1")
        self.tokenizer, self.context, self.carry = tokenizer, context, list(carry)
        self.chat = chat if chat is not None and chat.fraction > 0 else None
        self.mixed, self.reader, self.readers = list(mixed), reader, readers

    def _next_ids(self, docs: Iterator[str]) -> list[int] | None:
        taken, chat_tokens, tokens = self.mixed
        if self.chat is not None and (chat_tokens < self.chat.fraction * tokens or self.chat.fraction == 1):
            pool = self.chat.conversations
            ids = pool[(self.reader + taken * self.readers) % len(pool)]
            self.mixed = [taken + 1, chat_tokens + len(ids), tokens + len(ids)]
            return ids
        doc = next(docs, None)
        if doc is None:
            return None
        ids = self.tokenizer.encode(doc, prepend_bos=True)
        self.mixed[2] += len(ids)
        return ids

    def rows(self, docs: Iterator[str], n: int) -> list[list[int]]:
        """The next n rows, fewer when `docs` runs out (a partial last row stays in carry)."""
        need = n * self.context
        while len(self.carry) < need:
            ids = self._next_ids(docs)
            if ids is None:
                break
            self.carry.extend(ids)
        k = min(n, len(self.carry) // self.context)
        rows = [self.carry[i * self.context:(i + 1) * self.context] for i in range(k)]
        del self.carry[:k * self.context]
        return rows


class TokenBatches(IterableDataset):
    """Training token batches: {"tokens": LongTensor[rows, context], "worker": id, "state": position after it}.

    The documents come from a looping TextStream (each reader its own row groups); the state (the stream's
    position, the packer's carry and its chat counts) lets a reader resume at exactly the next batch.
    """

    def __init__(self, paths, tokenizer, context_size: int, rows: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start: dict | None = None, chat: ChatMix | None = None):
        self.tokenizer, self.context_size, self.rows = tokenizer, context_size, rows
        self.rank, self.world_size, self.chat = rank, world_size, chat
        self.stream = TextStream(paths, rank=rank, world_size=world_size, seed=seed, loop=True)
        self.carry: dict[int, list[int]] = {}
        self.mixed: dict[int, list[int]] = {}
        if start and start.get("workers"):
            workers = start["workers"]
            self.stream.load_state_dict(TextStream.merge_states(w["stream"] for w in workers.values()))
            self.carry = {int(k): list(w["carry"]) for k, w in workers.items()}
            self.mixed = {int(k): list(w["mixed"]) for k, w in workers.items() if "mixed" in w}

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        packer = Packer(self.tokenizer, self.context_size, self.carry.get(worker, []), self.chat,
                        self.mixed.get(worker, (0, 0, 0)), reader=self.rank * workers + worker,
                        readers=self.world_size * workers)
        docs = iter(self.stream)  # loops forever; it raises when a whole pass of its row groups has no text
        while True:
            rows = packer.rows(docs, self.rows)
            state = {"stream": self.stream.state_dict(), "carry": list(packer.carry), "mixed": list(packer.mixed)}
            yield {"tokens": torch.tensor(rows, dtype=torch.long), "worker": worker, "state": state}


def rows_for_tokens(n_tokens: int, context: int) -> int:
    """How many rows --tokens N means: enough to hold N positions (BOS included)."""
    return max(1, math.ceil(n_tokens / context))


def val_batches(val_shard: Path, tokenizer, context: int, n_rows: int, batch_rows: int,
                rank: int = 0, world_size: int = 1, chat: ChatMix | None = None) -> Iterator[torch.Tensor]:
    """The first n_rows rows of the val shard, in file order, as batches [<= batch_rows, context]; with a chat
    mix (its val split), the held-out conversations in order mixed in at its fraction.

    Under DDP each rank takes batches rank, rank + world_size, ... of the same sequence, so the ranks
    together read exactly the rows one process reads. Fewer rows come when the shard runs out.
    """
    if n_rows < 1 or batch_rows < 1:
        raise SAELightningError(f"need >= 1 val rows and rows per batch, got {n_rows} and {batch_rows}")
    docs = iter(TextStream([val_shard], loop=False, shuffle=False))
    packer, left, index = Packer(tokenizer, context, chat=chat), n_rows, 0
    while left > 0:
        rows = packer.rows(docs, min(batch_rows, left))
        if not rows:
            return
        if index % world_size == rank:
            yield torch.tensor(rows, dtype=torch.long)
        left, index = left - len(rows), index + 1
        if len(rows) < batch_rows and left > 0:  # the shard ran out
            return


REGIONS = ("text", "user", "assistant")  # chat_regions' labels 0, 1, 2
CHAT_MARKERS = ("<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>")


def chat_regions(tokens: torch.Tensor, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of `tokens` (rows in stream order, as val_batches gives them, flattened): its region, 0 text,
    1 a user turn, 2 an assistant turn (each turn's markers included), and whether it is one of CHAT_MARKERS."""
    flat = tokens.reshape(-1)
    ids = [tokenizer.encode_special(name) for name in CHAT_MARKERS]
    marker = torch.isin(flat, torch.tensor(ids, dtype=flat.dtype, device=flat.device))
    region = torch.zeros_like(flat)
    for label, (start, end) in ((1, ids[:2]), (2, ids[2:])):
        opened = (flat == start).long().cumsum(0)
        closed = torch.cat([flat.new_zeros(1), (flat == end).long().cumsum(0)[:-1]])  # the end marker is inside
        region[opened > closed] = label
    return region.reshape(tokens.shape), marker.reshape(tokens.shape)
