"""ActivationDataModule: text shards → token batches → frozen nanochat → activations → shuffle buffer.

DataLoader workers only read parquet and tokenize (TokenBatches). The frozen model lives here, on the
training device, never on the LightningModule (so it is not checkpointed, optimised or broadcast).
The train "dataloader" is an ActivationStream: it pulls token batches in a fixed worker order, runs
the model up to the deepest hook, drops BOS positions, scales, and fills a shuffle buffer of
`buffer_tokens` activations that is permuted as a whole and cut into SAE batches of `batch_size`.

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
from saelightning.cache import CacheBlocks, cache_scales, check_cache, read_manifest
from saelightning.errors import SAELightningError
from saelightning.faults import raise_if_stop_requested
from saelightning.hooks import hook_width, parse_hook
from saelightning.tokens import TokenBatches, val_batches

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
    """Activations of a frozen nanochat model at the SAEs' hook points, streamed from text shards.

    Args:
        model: nanochat checkpoint dir, model_XXXXXX.pt, nanochat base dir, or "demo" (the bundled model).
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
        val_batches: model batches (of model_batch_rows rows) of the val shard per validation.
        scale_batches: model batches used to estimate the normalisation constant (E||x||² = d_in).
        normalize: scale activations by that constant (stored in each SAE's input_scale).
        seed: data order seed (shard row groups and the buffer permutations).
        cache_dir: a `saelightning cache` output: train activations are read from it instead of running
            the model (validation still runs the model on the val shard; the scale comes from its manifest).
        max_buffer_bytes: refuse a config whose shuffle buffer at its peak (a refill's parts + their concatenation,
            fp32, every hook) exceeds this (default: half the training device's memory, GPU or host RAM).
        compile_model: run the model's truncated forward under torch.compile (the first model batch compiles,
            tens of seconds; then the activations come faster, see BENCHMARKS.md).
    """

    def __init__(self, model: str = "demo", data_dir: str = "demo", step: int | None = None, era: str | None = None,
                 source: str = "base", model_tag: str | None = None,
                 context_size: int | None = None, batch_size: int = 4096, model_batch_rows: int = 8,
                 buffer_tokens: int = 262144, num_workers: int = 1, val_batches: int = 4, scale_batches: int = 4,
                 normalize: bool = True, seed: int = 0, cache_dir: str | None = None,
                 max_buffer_bytes: int | None = None, compile_model: bool = False):
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
        self.nanochat = resolve.load_model(model, step=step, era=era, source=source, model_tag=model_tag)
        self.model_arg, self.era_arg, self.source, self.model_tag = model, era, source, model_tag
        self.model, self.tokenizer = self.nanochat.model, self.nanochat.tokenizer
        self._run_with_cache = self.model.capturer(compile_model)
        self.data_dir = data_dir
        self._train_shards, self._val_shard = resolve.shards(data_dir)  # a bad data dir fails here, not at setup
        self.context_size = context_size or self.model.config.sequence_len
        if not 1 <= self.context_size <= self.model.config.sequence_len:
            raise SAELightningError(f"data.context_size={self.context_size} must be in "
                                    f"[1, {self.model.config.sequence_len}] (the model's sequence_len)")
        self.batch_size, self.model_batch_rows, self.buffer_tokens = batch_size, model_batch_rows, buffer_tokens
        self.num_workers, self.val_batches, self.scale_batches = num_workers, val_batches, scale_batches
        self.normalize, self.seed, self.max_buffer_bytes = normalize, seed, max_buffer_bytes
        self.cache_dir = cache_dir
        self.cache_manifest = read_manifest(cache_dir) if cache_dir else None
        self.hooks: list[str] = []  # set by setup() from the LightningModule's SAEs
        self.device = torch.device("cpu")
        self.scales: dict[str, float] | None = None
        self._start: dict | None = None  # this rank's loaded position
        self._next_index = 0  # SAE batches handed to training_step so far
        self._first_index = 0  # the index this process started at (nothing trained here while equal)
        self._stream: ActivationStream | None = None
        self._val_tokens: list[torch.Tensor] | None = None

    # facts the SAE module needs (linked by the CLI so d_in is never typed)
    @property
    def n_layer(self) -> int:
        return self.model.n_layer

    @property
    def d_model(self) -> int:
        return self.model.d_model

    @property
    def model_info(self) -> dict:
        meta = self.nanochat.meta
        return {"path": meta["path"], "step": meta["step"], "era": meta["era"], "config": meta["model_config"],
                "context_size": self.context_size, "trained_on": self.trained_on}

    @property
    def trained_on(self) -> dict:
        """How to load this model and data again: what eval, viz, neuronpedia and generate default to."""
        def where(name: str) -> str:
            return name if name == "demo" else str(Path(name).expanduser().absolute())
        return {"model": where(self.model_arg), "step": self.nanochat.meta["step"], "era": self.era_arg,
                "source": self.source, "model_tag": self.model_tag, "data": where(str(self.data_dir))}

    def hook_width(self, name: str) -> int:
        return hook_width(name, self.n_layer, self.d_model)

    def buffer_peak_bytes(self, hooks: list[str]) -> int:
        """Peak bytes of the shuffle buffer: a refill's parts and their concatenation, fp32
        (a fill overshoots by < one forward)."""
        width = sum(self.hook_width(h) for h in dict.fromkeys(hooks))
        return 2 * (self.buffer_tokens + self.model_batch_rows * self.context_size) * width * 4

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
            parse_hook(name, self.n_layer)
        if self.cache_manifest is not None:
            check_cache(self.cache_manifest, {h: self.hook_width(h) for h in self.hooks}, self.model_info)
        if self.trainer is not None:
            self.device = self.trainer.strategy.root_device
        self.check_memory(self.hooks)
        self.model.to(self.device)

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def _may_stop(self) -> bool:
        """A stop signal may end work at once: nothing trained in this process yet, and one process (under DDP
        the ranks agree on a stop at a step's end, where one rank alone leaving would hang the others)."""
        return self._next_index == self._first_index and self._rank_world()[1] == 1

    @torch.no_grad()
    def capture(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Activations at the hook points for a token batch: BOS positions dropped, scaled, fp32."""
        tokens = tokens.to(self.device, non_blocking=True)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            cache = self._run_with_cache(tokens, self.hooks)
        keep = tokens.reshape(-1) != self.tokenizer.bos_id
        scales = self.scales or {}
        return {h: cache[h].reshape(-1, cache[h].shape[-1])[keep].float() * scales.get(h, 1.0) for h in self.hooks}

    def _token_batches(self, paths, start=None) -> TokenBatches:
        rank, world = self._rank_world()
        return TokenBatches(paths, self.tokenizer, self.context_size, self.model_batch_rows, rank, world, self.seed,
                            start)

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

    def _cache_reader(self, start: dict | None) -> TokenReader:
        rank, world = self._rank_world()
        make = lambda s: CacheBlocks(self.cache_manifest, self.hooks, self.batch_size, rank, world, self.seed, s)  # noqa: E731
        return TokenReader(make, self.num_workers, start)

    def train_dataloader(self) -> ActivationStream:
        self._ensure_scales()
        rank, _ = self._rank_world()
        start = copy.deepcopy(self._start)
        self._next_index = self._first_index = 0 if start is None else start["index"]
        if self.cache_manifest is not None:  # the same shuffle buffer, fed from disk instead of the model
            make_reader, capture = self._cache_reader, self._from_cache
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
        shard, the same rows `saelightning eval` reads (the model and the SAEs run in validation_step)."""
        self._ensure_scales()
        if self._val_tokens is None:
            rank, world = self._rank_world()
            rows = self.val_batches * self.model_batch_rows
            self._val_tokens = list(val_batches(self._val_shard, self.tokenizer, self.context_size, rows,
                                                self.model_batch_rows, rank, world))
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
        if world > 1 and dist.is_available() and dist.is_initialized():
            positions = [None] * world
            dist.all_gather_object(positions, mine)  # rank 0 writes the checkpoint: it needs every rank's
        else:
            positions = [mine]
        return {"version": STATE_VERSION, "scales": self.scales, "positions": positions, "seed": self.seed,
                "batch_size": self.batch_size, "buffer_tokens": self.buffer_tokens, "source": self._source()}

    def _source(self) -> str:
        """What the positions index: the text shards ("live") or a cache (its shard checksums)."""
        if self.cache_manifest is None:
            return "live"
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
            raise SAELightningError("the checkpoint's data position is in another source (live stream vs a cache, "
                                    "or another cache); resume with the data.cache_dir it was trained with")
        self.scales = state["scales"]
        self._start = state["positions"][rank]

    def __repr__(self) -> str:
        return f"ActivationDataModule(model={self.nanochat.meta['path']}, data_dir={self.data_dir}, hooks={self.hooks})"
