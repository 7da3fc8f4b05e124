"""nanochat's text shards: shard_{index:05d}.parquet, one "text" column, row groups of documents.

The last shard (sorted) is the validation split. TextStream reads row group by row group, so memory
stays bounded by one row group whatever the shard size. Like nanochat's loader it gives each reader
every world-th row group; here the readers are the (rank, DataLoader worker) pairs, and the row
groups of all shards are pooled and shuffled per epoch so that readers get equal shares.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from saelightning.atomic import atomic_path
from saelightning.errors import SAELightningError

TEXT_COLUMN = "text"
STATE_VERSION = 1


def list_shards(data_dir: str | os.PathLike) -> tuple[list[Path], Path]:
    """(train shards, val shard): all sorted *.parquet files but the last, and the last."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise SAELightningError(f"data directory {root} does not exist; "
                                "point data_dir at a folder of nanochat parquet shards")
    shards = sorted(p for p in root.glob("*.parquet") if p.is_file())
    if len(shards) < 2:
        raise SAELightningError(
            f"{root} holds {len(shards)} parquet shard(s); "
            "nanochat needs at least 2 (train shards + the last one for val)"
        )
    # a wrong format shows in the first train shard or the val shard: fail now, not in a DataLoader worker
    _row_group_counts([shards[0], shards[-1]])
    return shards[:-1], shards[-1]


def write_shards(
    texts: Iterable[str], data_dir: str | os.PathLike, docs_per_shard: int, row_group_size: int = 1024
) -> list[Path]:
    """Write documents as shard_00000.parquet, ... (nanochat's format); returns the paths written."""
    if docs_per_shard < 1 or row_group_size < 1:
        raise SAELightningError(f"docs_per_shard ({docs_per_shard}) and row_group_size ({row_group_size}) must be >= 1")
    root = Path(data_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    if any(root.glob("*.parquet")):
        raise SAELightningError(f"{root} already holds parquet shards; write new shards into an empty directory")
    paths, batch = [], []
    for text in texts:
        batch.append(text)
        if len(batch) == docs_per_shard:
            paths.append(_write_one(batch, root / f"shard_{len(paths):05d}.parquet", row_group_size))
            batch = []
    if batch:
        paths.append(_write_one(batch, root / f"shard_{len(paths):05d}.parquet", row_group_size))
    if not paths:
        raise SAELightningError("write_shards got no documents; pass a non-empty iterable of strings")
    return paths


def _write_one(texts: list[str], path: Path, row_group_size: int) -> Path:
    table = pa.table({TEXT_COLUMN: pa.array(texts, type=pa.string())})
    with atomic_path(path) as tmp:
        # The same writer options as nanochat's data repackaging (zstd, no dictionary, no stats).
        pq.write_table(table, tmp, row_group_size=row_group_size, use_dictionary=False,
                       compression="zstd", compression_level=3, write_statistics=False)
    return path


def _row_group_counts(paths: list[Path]) -> list[int]:
    counts = []
    for path in paths:
        if not path.is_file():
            raise SAELightningError(f"shard {path} does not exist; list shards with list_shards(data_dir)")
        try:
            meta = pq.ParquetFile(path)
        except Exception as exc:
            raise SAELightningError(f"{path} is not a readable parquet file ({exc}); "
                                    "re-download or rewrite the shard") from None
        if TEXT_COLUMN not in meta.schema_arrow.names:
            raise SAELightningError(
                f"{path} has no {TEXT_COLUMN!r} column (columns: {meta.schema_arrow.names}); "
                "nanochat shards hold one 'text' column"
            )
        counts.append(meta.metadata.num_row_groups)
    return counts


class TextStream(torch.utils.data.IterableDataset):
    """Documents (str) from parquet shards, striped over ranks and DataLoader workers, resumable exactly.

    Reader slot = rank * num_workers + worker_id, of world = world_size * num_workers readers. Each
    epoch, the (shard, row group) units of all paths are put in an order shuffled with seed + epoch,
    and slot s reads units s, s + world, s + 2*world, ...: the readers are disjoint and together cover
    every document once per epoch. state_dict() is the position of the readers of this process (the
    worker's own slot inside a DataLoader worker: report it with each batch and merge_states() the
    latest per worker); after load_state_dict() the next pass of each slot resumes where it was,
    otherwise every pass starts at the beginning.
    """

    def __init__(self, paths: Iterable[str | os.PathLike], rank: int = 0, world_size: int = 1,
                 seed: int = 0, loop: bool = True, shuffle: bool = True):
        self.paths = [Path(p).expanduser() for p in paths]
        if not self.paths:
            raise SAELightningError("TextStream got no shard paths; "
                                    "pass the train or val shards from list_shards(data_dir)")
        if not 0 <= rank < world_size:
            raise SAELightningError(f"rank {rank} is outside world_size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.seed, self.loop, self.shuffle = seed, loop, shuffle
        self._units = [(f, g) for f, n in enumerate(_row_group_counts(self.paths)) for g in range(n)]
        if not self._units:
            raise SAELightningError(f"the shards {[str(p) for p in self.paths]} hold no row groups (no documents)")
        self._positions: dict[int, dict] = {}  # worker id -> {"epoch", "cursor", "row"} of the next doc to yield
        self._resume: dict[int, dict] = {}  # loaded positions, each used by the next pass of its worker
        self._num_workers: int | None = None  # as recorded in a loaded state, checked on iteration

    # --- position bookkeeping ---

    def _unit_order(self, epoch: int) -> list[tuple[int, int]]:
        order = list(self._units)
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def state_dict(self) -> dict:
        workers = torch.utils.data.get_worker_info()
        positions = {**self._resume, **self._positions}
        if workers is not None:  # inside a worker only its own slot is known
            positions = {k: v for k, v in positions.items() if k == workers.id}
        return {
            "version": STATE_VERSION, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
            "num_workers": self._num_workers if workers is None else workers.num_workers,
            "row_groups": len(self._units),  # a resume over different shards would land elsewhere
            "positions": {int(k): dict(v) for k, v in positions.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise SAELightningError(f"TextStream state version {state.get('version')} is not {STATE_VERSION}; "
                                    "it comes from another saelightning")
        current = {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "row_groups": len(self._units)}
        for key, value in current.items():
            if state.get(key) != value:
                raise SAELightningError(
                    f"TextStream state was saved with {key}={state.get(key)}, this stream has {value}; "
                    "resume with the same shards and setting"
                )
        self._num_workers = state.get("num_workers")
        self._resume = {int(k): dict(v) for k, v in state["positions"].items()}
        self._positions = {}

    @staticmethod
    def merge_states(states: Iterable[dict]) -> dict:
        """One state from the per-worker states reported by DataLoader workers (positions united)."""
        states = list(states)
        if not states:
            raise SAELightningError("merge_states got no states")
        merged = dict(states[0], positions={})
        for state in states:
            merged["positions"].update(state["positions"])
        return merged

    # --- iteration ---

    def _slot(self) -> tuple[int, int, int]:
        workers = torch.utils.data.get_worker_info()
        worker_id, num_workers = (0, 1) if workers is None else (workers.id, workers.num_workers)
        if self._num_workers is not None and self._num_workers != num_workers and self._resume:
            raise SAELightningError(
                f"TextStream state was saved with {self._num_workers} DataLoader worker(s), now {num_workers}; "
                "resume with the same num_workers"
            )
        self._num_workers = num_workers
        return worker_id, self.rank * num_workers + worker_id, self.world_size * num_workers

    def __iter__(self) -> Iterator[str]:
        worker_id, slot, world = self._slot()
        # A pass starts where a loaded state says, else at the beginning (so each val pass is the same).
        pos = self._resume.pop(worker_id, None) or {"epoch": 0, "cursor": 0, "row": 0}
        self._positions[worker_id] = pos
        while True:
            mine = self._unit_order(pos["epoch"])[slot::world]
            whole_pass, texts_seen = pos["cursor"] == 0 and pos["row"] == 0, False
            while pos["cursor"] < len(mine):
                file_index, group = mine[pos["cursor"]]
                texts = self._read_group(file_index, group)
                while pos["row"] < len(texts):
                    text = texts[pos["row"]]
                    pos["row"] += 1  # advanced before yielding: the state always names the next document
                    texts_seen = texts_seen or bool(text)
                    yield text
                pos["cursor"], pos["row"] = pos["cursor"] + 1, 0
            if not self.loop:
                return
            if not mine:  # more readers than row groups: this one has nothing, and would spin forever
                raise SAELightningError(
                    f"reader {slot} of {world} gets no row group of {len(self._units)}; "
                    "use fewer ranks x workers or smaller row groups"
                )
            if whole_pass and not texts_seen:  # looping again would spin forever without a token
                names = ", ".join(sorted({self.paths[f].name for f, _ in mine}))
                raise SAELightningError(
                    f"a whole pass over {len(mine)} row group(s) of {names} gave no text (every document is empty "
                    "or the row groups hold no rows); write shards whose 'text' column holds the documents"
                )
            pos.update(epoch=pos["epoch"] + 1, cursor=0, row=0)

    def _read_group(self, file_index: int, group: int) -> list[str]:
        path = self.paths[file_index]
        try:
            table = pq.ParquetFile(path).read_row_group(group, columns=[TEXT_COLUMN])
        except Exception as e:  # pyarrow's errors for damaged data pages come in several types
            raise SAELightningError(f"row group {group} of {path} cannot be read ({type(e).__name__}: "
                                    f"{' '.join(str(e).split())[:200]}); re-download or rewrite the shard") from None
        return table.column(TEXT_COLUMN).to_pylist()

    def __repr__(self) -> str:
        return (f"TextStream({len(self.paths)} shard(s), {len(self._units)} row groups, rank {self.rank}/"
                f"{self.world_size}, seed {self.seed}, loop={self.loop})")
