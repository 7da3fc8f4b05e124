"""ActivationDataModule: text shards → token batches → frozen nanochat → activations → shuffle buffer.

DataLoader workers only read parquet and tokenize (TokenBatches). The frozen model lives here, on the
training device, never on the LightningModule (so it is not checkpointed, optimised or broadcast).
The train "dataloader" is an ActivationStream: it pulls token batches in a fixed worker order, runs
the model up to the deepest hook, drops BOS positions, scales, and fills a shuffle buffer of
`buffer_tokens` activations that is permuted as a whole and cut into SAE batches of `batch_size`.

The same stream serves the model-free sources: `data.activations` (shards that another program wrote, with
a manifest: activations.py) and `data.synthetic` (a generator with known features: synthetic.py). Their
readers hand TokenReader blocks of activations (or of synthetic block indices) instead of token batches,
validation reads their held-out part instead of running the model, and the SAE module is told each hook's
width (hook_widths) instead of the model's depth and width.

Exact resume: a buffer is refilled whole, so the state of the next SAE batch is (the token readers'
position when its buffer was filled, the buffer's index, how many batches were already drawn from
it). Resuming replays that one refill (same tokens, same forward, same permutation seeded from the
buffer index) and skips the drawn batches. Every rank's state goes into the Lightning checkpoint.
"""

from __future__ import annotations

import atexit
import copy
import ctypes
import hashlib
import math
import os
import signal
import sys
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from saelightning import resolve
from saelightning.activations import HeldOut, mean_squared_norms, read_activations, train_view
from saelightning.cache import CacheBlocks, cache_scales, chat_record, check_cache, check_origin, read_manifest
from saelightning.errors import SAELightningError
from saelightning.faults import raise_if_stop_requested
from saelightning.hooks import hook_width, parse_hook
from saelightning.resolve import ModelSource, split_key, tokenizer_fingerprint
from saelightning.synthetic import HOOK as SYNTHETIC_HOOK
from saelightning.synthetic import (
    SCALE,
    TRAIN,
    SyntheticBlocks,
    SyntheticConfig,
    SyntheticVal,
    check_config,
    check_same,
    load_or_build,
    read_model,
)
from saelightning.tokens import ChatMix, TokenBatches, val_batches

STATE_VERSION = 1


# --- token batches (DataLoader workers) ---

def _init_worker(worker_id: int) -> None:
    """In DataLoader workers: a signal sent to the whole process group (SLURM, Ctrl-C, a container stop) is the
    main process's to act on (save, then shut the workers down); a worker killed by it would crash the step.
    A worker that ignores SIGTERM must still die with the main process: on Linux, the kernel kills it then."""
    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


# the DataLoader worker processes this process started; they ignore SIGTERM, so multiprocessing's own exit
# handler (terminate, then join) would wait for them forever: they are killed first, at exit or on an error
_WORKERS: "weakref.WeakSet" = weakref.WeakSet()


def _kill_workers(processes=None) -> None:
    """Kill the given worker processes (default: all this process started) that are still alive."""
    for process in list(_WORKERS if processes is None else processes):
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


atexit.register(_kill_workers)  # registered after multiprocessing's handler, so it runs before it


def _worker_error(err: Exception) -> SAELightningError | None:
    """A SAELightningError raised in a worker arrives wrapped in the worker's traceback: its own message again."""
    text = str(err)
    marker = "SAELightningError: "
    if isinstance(err, SAELightningError) and "Original Traceback" in text and marker in text:
        return SAELightningError(text.rsplit(marker, 1)[1].strip())
    return None


class TokenReader:
    """Token batches from a DataLoader over TokenBatches, in a fixed worker order, with an exact position.

    Batches are taken from workers 0, 1, ..., W-1, 0, ... starting at `next_worker`; a resumed
    DataLoader starts at worker 0, so batches that arrive early are held until their turn.
    """

    def __init__(self, make_dataset: Callable[[dict | None], TokenBatches], num_workers: int, start: dict | None):
        if start is not None and start["num_workers"] != num_workers:
            raise SAELightningError(
                f"the checkpoint's data position was saved with data.num_workers={start['num_workers']}, "
                f"now {num_workers}; resume with the same data.num_workers"
            )
        self.make_dataset, self.num_workers = make_dataset, num_workers
        self.next_worker = 0 if start is None else start["next_worker"]
        self.workers: dict[int, dict] = {} if start is None else copy.deepcopy(start["workers"])
        self._start = start

    def state(self) -> dict:
        return {"num_workers": self.num_workers, "next_worker": self.next_worker,
                "workers": copy.deepcopy(self.workers)}

    def __iter__(self) -> Iterator[torch.Tensor]:
        loader = DataLoader(self.make_dataset(self._start), batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=2 if self.num_workers else None,
                            worker_init_fn=_init_worker if self.num_workers else None)
        it, held, turns = iter(loader), defaultdict(deque), max(self.num_workers, 1)
        _WORKERS.update(getattr(it, "_workers", []))
        try:
            while True:
                w = self.next_worker
                while not held[w]:
                    try:
                        item = next(it)
                    except SAELightningError as err:
                        raise (_worker_error(err) or err) from None
                    held[item["worker"]].append(item)
                item = held[w].popleft()
                self.workers[w] = item["state"]
                self.next_worker = (w + 1) % turns
                yield item["tokens"]
        finally:  # an error, a stop or the end of the stream: the workers go now, not at interpreter exit
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            _kill_workers(getattr(it, "_workers", []))


# --- activations ---

def _buffer_seed(seed: int, rank: int, chunk: int) -> int:
    return ((seed * 1_000_003 + rank) * 1_000_003 + chunk) % (2**63)


class ActivationStream:
    """The train iterable: SAE batches {"acts": {hook: [batch_size, d]}, "index": n} from a shuffle buffer."""

    def __init__(self, make_reader: Callable[[dict | None], TokenReader], capture: Callable, scales: dict[str, float],
                 buffer_tokens: int, batch_size: int, seed: int, rank: int, start: dict | None = None,
                 may_stop: Callable[[], bool] = lambda: False):
        self.make_reader, self.capture, self.scales = make_reader, capture, scales
        self.buffer_tokens, self.batch_size, self.seed, self.rank = buffer_tokens, batch_size, seed, rank
        self.start = start or {"chunk": 0, "reader": None, "offset": 0, "index": 0}
        self.may_stop = may_stop  # True while a stop signal may end a fill at once (nothing trained yet)
        self._chunks: deque = deque(maxlen=3)  # (chunk, reader state at its fill, first index, n batches)
        self._filling: tuple[int, dict] | None = None  # (chunk, reader state) of the fill in progress
        self._reader: TokenReader | None = None

    def __iter__(self) -> Iterator[dict]:
        chunk, offset, index = self.start["chunk"], self.start["offset"], self.start["index"]
        self._reader = self.make_reader(self.start["reader"])
        tokens = iter(self._reader)
        while True:
            fill_state = self._reader.state()
            self._filling = (chunk, fill_state)
            buffer = self._fill(tokens)
            self._filling = None
            n = next(iter(buffer.values())).shape[0]
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(_buffer_seed(self.seed, self.rank, chunk)))
            perm = perm.to(next(iter(buffer.values())).device)
            n_batches = n // self.batch_size
            self._chunks.append((chunk, fill_state, index - offset, n_batches))
            for j in range(offset, n_batches):
                rows = perm[j * self.batch_size:(j + 1) * self.batch_size]
                yield {"acts": {h: a[rows] for h, a in buffer.items()}, "scales": self.scales, "index": index}
                index += 1
            chunk, offset, buffer = chunk + 1, 0, None  # freed before the next fill: peak = parts + their concatenation

    def _fill(self, tokens: Iterator[torch.Tensor]) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        count = 0
        while count < self.buffer_tokens:
            if self.may_stop():
                raise_if_stop_requested("the first fill of the shuffle buffer")
            acts = self.capture(next(tokens))
            for h, a in acts.items():
                parts[h].append(a)
            count += a.shape[0]
        return {h: torch.cat(p) for h, p in parts.items()}

    def state_at(self, next_index: int) -> dict:
        """The position from which the SAE batch number `next_index` is the next one produced."""
        for chunk, fill_state, first, n_batches in reversed(self._chunks):
            if first <= next_index < first + n_batches:
                return {"chunk": chunk, "reader": fill_state, "offset": next_index - first, "index": next_index}
        if self._chunks:
            chunk, _, first, n_batches = self._chunks[-1]
            if next_index == first + n_batches:  # the next buffer is not filled (or not yet whole): it starts here
                reader = self._filling[1] if self._filling is not None else self._reader.state()
                return {"chunk": chunk + 1, "reader": reader, "offset": 0, "index": next_index}
        if next_index == self.start["index"]:
            return copy.deepcopy(self.start)
        raise SAELightningError(f"internal: SAE batch {next_index} is outside the buffers this stream kept")


class ValBatches:
    """The val iterable: the same token batches {"tokens": [rows, context]} every validation (one loader, not a
    list of loaders, which is what Lightning would take a plain list for)."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict]:
        return iter({"tokens": t} for t in self.batches)


# --- the data module ---

class ActivationDataModule(pl.LightningDataModule):
    """Activations of a frozen nanochat model at the SAEs' hook points, streamed from text shards; or, with
    `activations` or `synthetic`, activations without a model.

    Args:
        model: nanochat checkpoint dir, model_XXXXXX.pt, nanochat base dir, or "demo" (the bundled model); not read
            with activations or synthetic.
        data_dir: folder of nanochat parquet shards (the last is val), or "demo" (built from the stdlib).
        step: checkpoint step to load (default: the latest).
        era: "original" | "current" to override the era detected from the checkpoint's keys.
        source: which checkpoints of a nanochat base dir: base | mid | sft | rl.
        model_tag: the base dir's model folder (e.g. d20; default: the deepest d*).
        context_size: tokens per row fed to the model (default: the model's sequence_len).
        batch_size: SAE batch size in tokens (per rank).
        model_batch_rows: rows of context_size tokens per model forward.
        buffer_tokens: shuffle buffer size in activations (per rank); refilled whole, then permuted.
        num_workers: DataLoader workers that read and tokenize (0: in the main process).
        val_batches: model batches (of model_batch_rows rows) of the val shard per validation (a model-free
            source: batches of batch_size held-out activations).
        scale_batches: model batches used to estimate the normalisation constant (E||x||² = d_in) (a model-free
            source: batches of batch_size, unless its manifest has the constant).
        normalize: scale activations by that constant (stored in each SAE's input_scale).
        seed: data order seed (shard row groups and the buffer permutations; a synthetic stream's samples).
        cache_dir: a `saelightning cache` output: train activations are read from it instead of running
            the model (validation still runs the model on the val shard; the scale comes from its manifest). With
            data.models, a cache of every model (`saelightning cache --models`); its models, tokenizer and chat mix
            must be this config's (refused in one line otherwise).
        max_buffer_bytes: refuse a config whose shuffle buffer at its peak (a refill's parts + their concatenation,
            fp32, every hook) exceeds this (default: half the training device's memory, GPU or host RAM).
        compile_model: run the model's truncated forward under torch.compile (the first model batch compiles,
            tens of seconds; then the activations come faster, see BENCHMARKS.md).
        activations: a directory of activation shards with a manifest (activations.py; a `saelightning cache`
            dir is one): train on them without a model. Their held-out tail (the manifest's val_tokens, else
            val_batches x batch_size activations) is never trained on; validation reads its first val_batches x
            batch_size. The SAEs' hook names are the manifest's. The model and text options above are then not read.
        models: two or more models run on the same token batches, for crosscoders (model diffing): each a
            ModelSource (name, path, source, step, model_tag, era; path defaults to data.model). Their activations
            are keyed "<name>/<hook>"; a crosscoder reads its hook in every model, an SAE names one ("chat/...").
            One tokenizer, one width and one vocabulary are required. The model options above then apply to the
            first model only where its entry leaves them out (context_size, compile_model apply to all). With
            cache_dir, training reads every model's activations from the cache instead.
        chat: conversations mixed into the text (a chat model is diffed on the text it was tuned for): "demo" (the
            stdlib docstring questions the demo's chat stage is tuned on) or a JSONL file, one conversation a line (a
            list of {"role", "content"} turns). Rendered in nanochat's conversation format (its special tokens);
            every tenth conversation is held out for validation (and eval / diff), the others are trained on.
        chat_fraction: the share of the tokens that are conversations, in [0, 1] (0: text only, 1: conversations
            only). Exact in tokens:
            a conversation is packed whenever the conversations' share so far is below it.
        synthetic: train on synthetic activations with known features (synthetic.py; hook name "synthetic"): its
            model is generated from its seed (or read from its file), the stream is generated as it is read, and
            validation (val_batches x batch_size held-out samples) adds the ground-truth metrics. The model and
            text options above are then not read.
    """

    def __init__(self, model: str | None = "demo", data_dir: str = "demo", step: int | None = None,
                 era: str | None = None, source: str = "base", model_tag: str | None = None,
                 context_size: int | None = None, batch_size: int = 4096, model_batch_rows: int = 8,
                 buffer_tokens: int = 262144, num_workers: int = 1, val_batches: int = 4, scale_batches: int = 4,
                 normalize: bool = True, seed: int = 0, cache_dir: str | None = None,
                 max_buffer_bytes: int | None = None, compile_model: bool = False, activations: str | None = None,
                 synthetic: SyntheticConfig | None = None, models: list[ModelSource] | None = None,
                 chat: str | None = None, chat_fraction: float = 0.0):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("model_batch_rows", model_batch_rows),
                            ("val_batches", val_batches), ("scale_batches", scale_batches)):
            if value < 1:
                raise SAELightningError(f"data.{name}={value} must be >= 1")
        if num_workers < 0:
            raise SAELightningError(f"data.num_workers={num_workers} must be >= 0")
        if buffer_tokens < batch_size:
            raise SAELightningError(f"need 1 <= batch_size ({batch_size}) <= buffer_tokens ({buffer_tokens}); "
                                    "raise data.buffer_tokens")
        self.batch_size, self.model_batch_rows, self.buffer_tokens = batch_size, model_batch_rows, buffer_tokens
        self.num_workers, self.val_batches, self.scale_batches = num_workers, val_batches, scale_batches
        self.normalize, self.seed, self.max_buffer_bytes = normalize, seed, max_buffer_bytes
        self.model_arg, self.era_arg, self.source, self.model_tag = model, era, source, model_tag
        self.data_dir, self.cache_dir = data_dir, cache_dir
        self.kind = self._kind(cache_dir, activations, synthetic)
        self.chat, self.chat_fraction = self._check_chat(chat, chat_fraction, self.kind)
        self._chat_mixes: dict[str, ChatMix | None] = {}
        self._conversations: list[list[dict]] | None = None
        self.nanochat = self.model = self.tokenizer = self.context_size = None
        self.activations_info: dict | None = None  # data.activations: the checked manifest
        self.synthetic_cfg: SyntheticConfig | None = None
        self.truth = None  # data.synthetic: the SyntheticModel (built or read at setup, on the training device)
        self.widths: dict[str, int] = {}  # a model-free source's hook widths
        if self.kind == "activations":
            self.activations_info = read_activations(activations, val_batches * batch_size)
            self.widths = dict(self.activations_info["d_in"])
        elif self.kind == "synthetic":
            self.synthetic_cfg = _as_synthetic(synthetic)
            self.widths = {SYNTHETIC_HOOK: self.synthetic_cfg.d_in}
        elif models:  # _load_models loads each of data.models (data.model is only their default path)
            self._train_shards, self._val_shard = resolve.shards(self.data_dir)  # a bad data dir fails here
        else:
            self._load_nanochat(model, step, era, source, model_tag, context_size, compile_model)
        self.sources: list[ModelSource] = []  # data.models (crosscoders): the models besides self.nanochat's
        self.others: dict[str, object] = {}  # name -> Nanochat of every model after the first
        if models:
            self._load_models(models, model, context_size, compile_model)
        self.cache_manifest = read_manifest(cache_dir) if cache_dir else None
        if self.cache_manifest is not None:
            check_origin(self.cache_manifest, self.model_info, tokenizer_fingerprint(self.tokenizer),
                         chat_record(self.chat_mix("train"), self.chat))
        self.hooks: list[str] = []  # set by setup() from the LightningModule's SAEs
        self.device = torch.device("cpu")
        self.scales: dict[str, float] | None = None
        self._start: dict | None = None  # this rank's loaded position
        self._next_index = 0  # SAE batches handed to training_step so far
        self._first_index = 0  # the index this process started at (nothing trained here while equal)
        self._stream: ActivationStream | None = None
        self._val_tokens: list[torch.Tensor] | None = None

    @staticmethod
    def _kind(cache_dir, activations, synthetic) -> str:
        if activations is not None and synthetic is not None:
            raise SAELightningError("data.activations and data.synthetic are both given; train on one of them "
                                    "(set the other to null)")
        if (activations is not None or synthetic is not None) and cache_dir:
            raise SAELightningError(f"data.cache_dir and data.{'activations' if activations else 'synthetic'} are "
                                    "both given; data.cache_dir is the nanochat model's cache (validated with the "
                                    "model), the other trains without a model: set one of them to null")
        return "activations" if activations is not None else "synthetic" if synthetic is not None else \
            "cache" if cache_dir else "live"

    @staticmethod
    def _check_chat(chat, fraction, kind) -> tuple[str | None, float]:
        if not 0.0 <= fraction <= 1.0:
            raise SAELightningError(f"data.chat_fraction={fraction} must be in [0, 1] (the share of the tokens that "
                                    "are chat conversations)")
        if fraction > 0 and chat is None:
            raise SAELightningError(f"data.chat_fraction={fraction} but data.chat is null; give data.chat (a JSONL "
                                    "file of conversations, or demo)")
        if fraction > 0 and kind not in ("live", "cache"):
            raise SAELightningError("data.chat mixes conversations into the text the model reads; it cannot be "
                                    "combined with data.activations or data.synthetic")
        return chat, fraction

    def chat_mix(self, split: str) -> ChatMix | None:
        """data.chat's conversations of one split ("train" or "val"), rendered once; None without a mix."""
        if self.chat_fraction == 0:
            return None
        if split not in self._chat_mixes:
            if self._conversations is None:
                self._conversations = resolve.conversations(self.chat)
            self._chat_mixes[split] = ChatMix.render(self.tokenizer, self._conversations, self.chat_fraction, split,
                                                     self.seed, self.chat)
        return self._chat_mixes[split]

    def _load_models(self, models, default_path, context_size, compile_model) -> None:
        """data.models: the first replaces the single model, the others run beside it on the same tokens."""
        if self.model_free:
            raise SAELightningError("data.models runs the models on text; it cannot be combined with "
                                    "data.activations or data.synthetic (data.cache_dir: a cache of every model)")
        sources, loaded = resolve.load_models(models, default_path)
        self.sources = sources
        self.nanochat, self.era_arg, self.model_arg = loaded[0], sources[0].era, sources[0].path
        self.model, self.tokenizer = self.nanochat.model, self.nanochat.tokenizer
        self._run_with_cache = self.model.capturer(compile_model)
        self.others = {s.name: nanochat for s, nanochat in zip(sources[1:], loaded[1:])}
        self._other_capture = {name: n.model.capturer(compile_model) for name, n in self.others.items()}
        seq = min(n.model.config.sequence_len for n in loaded)
        self.context_size = context_size or seq
        if not 1 <= self.context_size <= seq:
            raise SAELightningError(f"data.context_size={self.context_size} must be in [1, {seq}] (the models' "
                                    "shortest sequence_len)")

    @property
    def model_names(self) -> list[str] | None:
        """data.models' names (None: one model); the SAE module keys a crosscoder's input by them."""
        return [s.name for s in self.sources] or None

    def model_of(self, name: str | None):
        """The nanochat model a hook key reads (the first model for a plain hook)."""
        if name is None or (self.sources and name == self.sources[0].name):
            return self.model
        if name not in self.others:
            raise SAELightningError(f"no model named {name!r} in data.models (they are {self.model_names}); "
                                    "name one of them before the hook, as in base/blocks.2.hook_resid_post")
        return self.others[name].model

    def _load_nanochat(self, model, step, era, source, model_tag, context_size, compile_model) -> None:
        if model is None:
            raise SAELightningError("data.model is null: give a nanochat model (or demo), or train without one "
                                    "with data.activations or data.synthetic")
        self.nanochat = resolve.load_model(model, step=step, era=era, source=source, model_tag=model_tag)
        self.model, self.tokenizer = self.nanochat.model, self.nanochat.tokenizer
        self._run_with_cache = self.model.capturer(compile_model)
        self._train_shards, self._val_shard = resolve.shards(self.data_dir)  # a bad data dir fails here, not at setup
        self.context_size = context_size or self.model.config.sequence_len
        if not 1 <= self.context_size <= self.model.config.sequence_len:
            raise SAELightningError(f"data.context_size={self.context_size} must be in "
                                    f"[1, {self.model.config.sequence_len}] (the model's sequence_len)")

    @property
    def model_free(self) -> bool:
        return self.kind in ("activations", "synthetic")

    # facts the SAE module needs (linked by the CLI so d_in is never typed)
    @property
    def n_layer(self) -> int:
        return 0 if self.model_free else self.model.n_layer

    @property
    def d_model(self) -> int:
        return 0 if self.model_free else self.model.d_model

    @property
    def hook_widths(self) -> dict[str, int] | None:
        """A model-free source's hooks and their widths (None: the nanochat model's hook grammar applies)."""
        return dict(self.widths) if self.model_free else None

    @property
    def model_info(self) -> dict:
        if self.model_free:
            return {"path": None, "step": None, "era": None, "config": None, "context_size": None,
                    "trained_on": self.trained_on}
        meta = self.nanochat.meta
        info = {"path": meta["path"], "step": meta["step"], "era": meta["era"], "config": meta["model_config"],
                "context_size": self.context_size, "trained_on": self.trained_on}
        if self.sources:  # every model a crosscoder reads: what an export names
            info["models"] = resolve.models_info(self.sources, [self.nanochat, *self.others.values()])
        return info

    @property
    def trained_on(self) -> dict:
        """How to load this model and data again: what eval, viz, neuronpedia and generate default to. A model-free
        source records where its activations are (or its synthetic model's file and config) and the held-out part."""
        if self.kind == "activations":
            info = self.activations_info
            return {"activations": info["dir"], "id": info["id"], "held_out": info["val_tokens"],
                    "val_tokens": self._held_out_tokens(), "block": self.batch_size, "source": info["source"]}
        if self.kind == "synthetic":
            return {"synthetic": str(self.synthetic_cfg.path()), "config": self.synthetic_cfg.model_dict(),
                    "val_tokens": self.val_batches * self.batch_size, "block": self.batch_size}

        def where(name: str) -> str:
            return name if name == "demo" else str(Path(name).expanduser().absolute())
        out = {"model": where(self.model_arg), "step": self.nanochat.meta["step"], "era": self.era_arg,
               "source": self.source, "model_tag": self.model_tag, "data": where(str(self.data_dir))}
        if self.chat_fraction > 0:
            out["chat"], out["chat_fraction"] = where(self.chat), self.chat_fraction
        if self.sources:
            steps = [self.nanochat.meta["step"]] + [self.others[s.name].meta["step"] for s in self.sources[1:]]
            out["source"] = self.sources[0].source
            out["models"] = [{"name": s.name, "model": where(s.path), "source": s.source, "step": step,
                              "model_tag": s.model_tag, "era": s.era} for s, step in zip(self.sources, steps)]
        return out

    def _held_out_tokens(self) -> int:
        """Activations a validation reads (a model-free source): the first val_batches x batch_size held-out ones."""
        held_out = self.activations_info["val_tokens"] if self.kind == "activations" else math.inf
        return int(min(held_out, self.val_batches * self.batch_size))

    def hook_width(self, name: str) -> int:
        if self.model_free:
            if name not in self.widths:
                where = self.activations_info["dir"] if self.kind == "activations" else "a synthetic source"
                raise SAELightningError(f"the activations of {where} have no hook {name!r} (they hold "
                                        f"{sorted(self.widths)}); set the SAE's hook_name to one of them")
            return self.widths[name]
        model_name, hook = split_key(name)
        model = self.model_of(model_name)
        return hook_width(hook, model.n_layer, model.d_model)

    def buffer_peak_bytes(self, hooks: list[str]) -> int:
        """Peak bytes of the shuffle buffer: a refill's parts and their concatenation, fp32
        (a fill overshoots by < one forward, or one block of a model-free source)."""
        width = sum(self.hook_width(h) for h in dict.fromkeys(hooks))
        step = self.batch_size if self.model_free else self.model_batch_rows * self.context_size
        return 2 * (self.buffer_tokens + step) * width * 4

    def check_memory(self, hooks: list[str], device: torch.device | None = None) -> None:
        """Refuse a buffer larger than max_buffer_bytes (default: half the device's memory), as a one-line error."""
        device = device or self.device
        limit = self.max_buffer_bytes
        if limit is None:
            total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                     else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
            limit = total // 2
        need = self.buffer_peak_bytes(hooks)
        if need > limit:
            raise SAELightningError(
                f"the shuffle buffer needs up to {need / 2**30:.2f} GiB ({self.buffer_tokens} tokens x {len(hooks)} "
                f"hook(s), twice while refilling) and the limit is {limit / 2**30:.2f} GiB; "
                "lower data.buffer_tokens or raise data.max_buffer_bytes")

    # --- Lightning hooks ---

    def setup(self, stage: str) -> None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None and hasattr(module, "hook_names"):
            self.hooks = list(module.hook_names)
        if not self.hooks:
            raise SAELightningError("ActivationDataModule has no hook points; set dm.hooks or pair it with SAEModule")
        for name in self.hooks:
            if self.model_free:
                self.hook_width(name)
            else:
                model_name, hook = split_key(name)
                parse_hook(hook, self.model_of(model_name).n_layer)
        if self.cache_manifest is not None:
            check_cache(self.cache_manifest, {h: self.hook_width(h) for h in self.hooks})
        if self.trainer is not None:
            self.device = self.trainer.strategy.root_device
        self.check_memory(self.hooks)
        if self.model is not None:
            self.model.to(self.device)
        for other in self.others.values():
            other.model.to(self.device)
        if self.kind == "synthetic" and self.truth is None:
            self.truth = self._synthetic_model()

    def _synthetic_model(self):
        """The synthetic model on the training device. Rank 0 reads it from its file, or builds it and writes the
        file; under DDP the other ranks then read that file, so every rank has the same model."""
        cfg = self.synthetic_cfg
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        distributed = world > 1 and dist.is_available() and dist.is_initialized()
        model = load_or_build(cfg, self.device) if rank == 0 else None
        if distributed:
            dist.barrier()
        if model is None:
            model = read_model(cfg.path())
            check_same(cfg, model)
        return model.to(self.device)

    def _rank_world(self) -> tuple[int, int]:
        """This rank's data-parallel rank and size: under the latent_parallel strategy the ranks of a latent group
        read the same batches."""
        if self.trainer is not None:
            strategy = self.trainer.strategy
            if hasattr(strategy, "data_parallel_size"):
                return strategy.data_parallel_rank, strategy.data_parallel_size
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def _may_stop(self) -> bool:
        """A stop signal may end work at once: nothing trained in this process yet, and one process (under DDP
        the ranks agree on a stop at a step's end, where one rank alone leaving would hang the others)."""
        return self._next_index == self._first_index and self._rank_world()[1] == 1

    @torch.no_grad()
    def capture(self, tokens: torch.Tensor, scaled: bool = True) -> dict[str, torch.Tensor]:
        """Activations at the hook points for a token batch: BOS positions dropped, scaled (unless scaled=False),
        fp32. With data.models each model runs on the same tokens, up to its own deepest hook key."""
        tokens = tokens.to(self.device, non_blocking=True)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        by_model: dict[str | None, list[str]] = defaultdict(list)
        for key in self.hooks:
            by_model[split_key(key)[0] if self.sources else None].append(key)
        cache = {}
        with autocast:
            for model_name, keys in by_model.items():
                first = model_name is None or model_name == self.sources[0].name
                run = self._run_with_cache if first else self._other_capture[model_name]
                hooks = [split_key(k)[1] if self.sources else k for k in keys]
                got = run(tokens, hooks)
                cache.update({k: got[h] for k, h in zip(keys, hooks)})
        keep = tokens.reshape(-1) != self.tokenizer.bos_id
        scales = (self.scales or {}) if scaled else {}
        return {h: cache[h].reshape(-1, cache[h].shape[-1])[keep].float() * scales.get(h, 1.0) for h in self.hooks}

    def _token_batches(self, paths, start=None) -> TokenBatches:
        rank, world = self._rank_world()
        return TokenBatches(paths, self.tokenizer, self.context_size, self.model_batch_rows, rank, world, self.seed,
                            start, chat=self.chat_mix("train"))

    def _ensure_scales(self) -> None:
        """Estimate the normalisation constant per hook from the first batches of the train stream."""
        if self.scales is not None:
            return
        if not self.normalize:
            self.scales = {h: 1.0 for h in self.hooks}
            return
        if self.cache_manifest is not None:  # E||x||² over the whole cache
            self.scales = cache_scales(self.cache_manifest, self.hooks)
            return
        if self.kind == "activations":  # the manifest's E||x||², else the first training activations' (every rank)
            msn = mean_squared_norms(self.activations_info, self.hooks, self.scale_batches * self.batch_size)
            self.scales = {h: math.sqrt(self.widths[h] / msn[h]) for h in self.hooks}
            return
        if self.kind == "synthetic":  # the first blocks of the model's SCALE stream: the same for every run and rank
            blocks = [self.truth.block(SCALE, self.truth.cfg.seed, i, self.batch_size)[0]
                      for i in range(self.scale_batches)]
            mean_sq = torch.cat(blocks).double().pow(2).sum(-1).mean().item()
            self.scales = {SYNTHETIC_HOOK: math.sqrt(self.widths[SYNTHETIC_HOOK] / mean_sq)}
            return
        sums = torch.zeros(2, len(self.hooks), dtype=torch.float64, device=self.device)
        batches = iter(self._token_batches(self._train_shards))
        for _ in range(self.scale_batches):
            if self._may_stop():
                raise_if_stop_requested("the scale estimate")
            acts = self.capture(next(batches)["tokens"])
            for i, h in enumerate(self.hooks):
                sums[0, i] += acts[h].double().pow(2).sum()
                sums[1, i] += acts[h].shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)  # one constant for all ranks
        mean_sq = sums[0] / sums[1]
        self.scales = {h: math.sqrt(self.hook_width(h) / mean_sq[i].item()) for i, h in enumerate(self.hooks)}

    def _from_cache(self, block: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {h: block[h].to(self.device, non_blocking=True).float() * self.scales[h] for h in self.hooks}

    def _cache_reader(self, start: dict | None, manifest: dict | None = None) -> TokenReader:
        rank, world = self._rank_world()
        manifest = manifest or self.cache_manifest
        make = lambda s: CacheBlocks(manifest, self.hooks, self.batch_size, rank, world, self.seed, s)  # noqa: E731
        return TokenReader(make, self.num_workers, start)

    def _synthetic_reader(self, start: dict | None) -> TokenReader:
        """On the CPU the DataLoader workers generate the blocks; on a GPU they hand out block indices and
        _from_synthetic generates them there."""
        rank, world = self._rank_world()
        model = self.truth if self.device.type == "cpu" else None
        make = lambda s: SyntheticBlocks(model, self.batch_size, self.seed, rank, world, s)  # noqa: E731
        return TokenReader(make, self.num_workers, start)

    def _from_synthetic(self, block: torch.Tensor) -> dict[str, torch.Tensor]:
        if block.dim() == 0:  # a block index: generate it on the training device
            block = self.truth.block(TRAIN, self.seed, int(block), self.batch_size)[0]
        return {SYNTHETIC_HOOK: block.to(self.device, non_blocking=True).float() * self.scales[SYNTHETIC_HOOK]}

    def train_dataloader(self) -> ActivationStream:
        self._ensure_scales()
        rank, _ = self._rank_world()
        start = copy.deepcopy(self._start)
        self._next_index = self._first_index = 0 if start is None else start["index"]
        if self.cache_manifest is not None:  # the same shuffle buffer, fed from disk instead of the model
            make_reader, capture = self._cache_reader, self._from_cache
        elif self.kind == "activations":  # the same, from the activation directory's training part
            view = train_view(self.activations_info)
            make_reader, capture = (lambda st: self._cache_reader(st, view)), self._from_cache
        elif self.kind == "synthetic":
            make_reader, capture = self._synthetic_reader, self._from_synthetic
        else:
            train = self._train_shards
            make_reader = lambda st: TokenReader(lambda s: self._token_batches(train, s), self.num_workers, st)  # noqa: E731
            capture = self.capture
        self._stream = ActivationStream(
            make_reader=make_reader, capture=capture, scales=self.scales, buffer_tokens=self.buffer_tokens,
            batch_size=self.batch_size, seed=self.seed, rank=rank, start=start, may_stop=self._may_stop,
        )
        return self._stream

    def val_dataloader(self) -> ValBatches:
        """This rank's val batches {"tokens": [rows, context]}: the first val_batches x model_batch_rows rows of the val
        shard, the same rows `saelightning eval` reads (the model and the SAEs run in validation_step). A model-free
        source: its held-out activations {"acts": {hook: x}} (raw units), with the true feature activations
        ("truth") for a synthetic one."""
        self._ensure_scales()
        if self.model_free:
            rank, world = self._rank_world()
            count = self._held_out_tokens()
            if self.kind == "activations":
                return HeldOut(self.activations_info, self.hooks, self.batch_size, rank, world, count)
            return SyntheticVal(self.truth, self.batch_size, count, rank, world)
        if self._val_tokens is None:
            rank, world = self._rank_world()
            rows = self.val_batches * self.model_batch_rows
            self._val_tokens = list(val_batches(self._val_shard, self.tokenizer, self.context_size, rows,
                                                self.model_batch_rows, rank, world, chat=self.chat_mix("val")))
            got = sum(len(t) for t in self._val_tokens)
            if rank == 0 and got * world < rows:
                rank_zero_warn(f"saelightning: the val shard {self._val_shard} holds {got} rows of {self.context_size} "
                               f"tokens, fewer than data.val_batches x data.model_batch_rows = {rows}; "
                               "validating on those")
            if not self._val_tokens and world == 1:
                raise SAELightningError(f"the val shard {self._val_shard} gave no row of {self.context_size} tokens; "
                                        "give a larger val shard or a smaller data.context_size")
        return ValBatches(self._val_tokens)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, dict) and "index" in batch:  # a train batch is about to be trained on
            self._next_index = batch["index"] + 1
        return batch

    # --- exact resume ---

    def _my_position(self) -> dict | None:
        if self._stream is not None:
            return self._stream.state_at(self._next_index)
        return copy.deepcopy(self._start)

    def state_dict(self) -> dict:
        mine = self._my_position()
        rank, world = self._rank_world()
        everyone = self.trainer.world_size if self.trainer is not None else 1
        if everyone > 1 and dist.is_available() and dist.is_initialized():
            positions = [None] * everyone
            dist.all_gather_object(positions, mine)  # rank 0 writes the checkpoint: it needs every rank's
            positions = positions[::everyone // world]  # one per data rank (a latent group's ranks read alike)
        else:
            positions = [mine]
        return {"version": STATE_VERSION, "scales": self.scales, "positions": positions, "seed": self.seed,
                "batch_size": self.batch_size, "buffer_tokens": self.buffer_tokens, "source": self._source()}

    def _source(self) -> str:
        """What the positions index: the text shards ("live"), a cache (its shard checksums), an activation
        directory (its shards and held-out count) or a synthetic model (its config)."""
        if self.kind == "activations":
            return "activations:" + self.activations_info["id"]
        if self.kind == "synthetic":
            return "synthetic:" + self.synthetic_cfg.fingerprint()
        if self.cache_manifest is None:
            return "live" if self.chat_fraction == 0 else "live+chat:" + self.chat_mix("train").fingerprint()
        checksums = ",".join(s["sha256"] for s in self.cache_manifest["shards"])
        return "cache:" + hashlib.sha256(checksums.encode()).hexdigest()[:16]

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise SAELightningError(f"checkpoint data state version {state.get('version')} is not {STATE_VERSION}")
        rank, world = self._rank_world()
        if len(state["positions"]) != world:
            raise SAELightningError(
                f"the checkpoint was written by {len(state['positions'])} process(es), this run has {world}; "
                "resume with the same number of devices x nodes"
            )
        for key in ("seed", "batch_size", "buffer_tokens"):
            if state[key] != getattr(self, key):
                raise SAELightningError(f"the checkpoint was trained with data.{key}={state[key]}, "
                                        f"now {getattr(self, key)}; resume with the same value")
        if state.get("source", "live") != self._source():
            raise SAELightningError("the checkpoint's data position is in another source (live stream, a cache, "
                                    "activations or a synthetic model, or another one of them, or another chat mix); "
                                    "resume with the data.cache_dir / data.activations / data.synthetic / data.chat "
                                    "and data.chat_fraction it was trained with")
        self.scales = state["scales"]
        self._start = state["positions"][rank]

    def __repr__(self) -> str:
        if self.model_free:
            return f"ActivationDataModule({self.kind}, hooks={self.hooks})"
        return f"ActivationDataModule(model={self.nanochat.meta['path']}, data_dir={self.data_dir}, hooks={self.hooks})"


def _as_synthetic(value) -> SyntheticConfig:
    if isinstance(value, SyntheticConfig):
        return check_config(value)
    if isinstance(value, dict):
        known = {f for f in SyntheticConfig.__dataclass_fields__}
        unknown = sorted(set(value) - known)
        if unknown:
            raise SAELightningError(f"data.synthetic has no field(s) {unknown}; its fields are {sorted(known)}")
        return check_config(SyntheticConfig(**value))
    raise SAELightningError(f"data.synthetic must be a mapping of SyntheticConfig fields, got {type(value).__name__}")
