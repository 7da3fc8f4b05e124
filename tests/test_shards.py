"""Parquet shards: nanochat's format, disjoint and complete striding, exact resume, one-line errors."""

import itertools

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from saelightning.errors import SAELightningError
from saelightning.nanochat.shards import TextStream, list_shards, write_shards
from tests.fixtures_data import SHARD_DOCS, SHARD_ROW_GROUP, tiny_texts


class WithState(IterableDataset):
    """Yields (document, stream position after it), the way a trainer reports worker positions."""

    def __init__(self, stream):
        self.stream = stream

    def __iter__(self):
        for text in self.stream:
            yield text, self.stream.state_dict()


def _loader(dataset, workers):
    return DataLoader(dataset, batch_size=None, num_workers=workers)


def test_format_and_split(tiny_shards_dir):
    train, val = list_shards(tiny_shards_dir)
    assert [p.name for p in train] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert val.name == "shard_00002.parquet"
    meta = pq.ParquetFile(val).metadata
    assert meta.num_rows == SHARD_DOCS and meta.num_row_groups == -(-SHARD_DOCS // SHARD_ROW_GROUP)
    assert meta.row_group(0).num_rows == SHARD_ROW_GROUP
    table = pq.read_table(val)
    assert table.column_names == ["text"] and table.column("text").to_pylist() == tiny_texts(300, seed=1)[200:]


def test_one_pass_covers_everything_once_in_seeded_order(tiny_shards_dir):
    train, _ = list_shards(tiny_shards_dir)
    expected = tiny_texts(300, seed=1)[:200]
    docs = list(TextStream(train, loop=False, seed=3))
    assert sorted(docs) == sorted(expected) and docs != expected  # all of them, shuffled by row group
    assert docs == list(TextStream(train, loop=False, seed=3))
    assert docs != list(TextStream(train, loop=False, seed=4))
    assert list(TextStream(train, loop=False, shuffle=False)) == expected
    # Row groups stay whole: the first 8 docs are one row group of the files.
    assert docs[:SHARD_ROW_GROUP] in [expected[i : i + SHARD_ROW_GROUP] for i in range(0, 200, SHARD_ROW_GROUP)]


def test_later_epochs_reshuffle(tiny_shards_dir):
    train, _ = list_shards(tiny_shards_dir)
    stream = list(itertools.islice(TextStream(train, seed=0), 400))
    first, second = stream[:200], stream[200:]
    assert sorted(first) == sorted(second) and first != second


def test_ranks_times_workers_disjoint_and_complete(tiny_shards_dir):
    train, _ = list_shards(tiny_shards_dir)
    per_reader = []
    for rank in range(2):
        stream = TextStream(train, rank=rank, world_size=2, seed=1, loop=False)
        per_reader.append(list(_loader(stream, workers=2)))
    everything = [doc for docs in per_reader for doc in docs]
    assert len(everything) == len(set(everything)) == 200
    assert sorted(everything) == sorted(tiny_texts(300, seed=1)[:200])
    assert all(len(docs) >= 4 * SHARD_ROW_GROUP for docs in per_reader)  # each rank got a fair share


def test_worker_slots_match_single_process_striding(tiny_shards_dir):
    # Worker w of rank r reads exactly what reader r*workers+w of a 4-reader world reads.
    train, _ = list_shards(tiny_shards_dir)
    with_workers = set(_loader(TextStream(train, rank=1, world_size=2, seed=5, loop=False), workers=2))
    slots = {doc for slot in (2, 3) for doc in TextStream(train, rank=slot, world_size=4, seed=5, loop=False)}
    assert with_workers == slots


@pytest.mark.parametrize("consumed", [0, 1, SHARD_ROW_GROUP, 37, 200, 203])
def test_restore_is_exact(tiny_shards_dir, consumed):
    train, _ = list_shards(tiny_shards_dir)
    reference = list(itertools.islice(TextStream(train, seed=2), consumed + 60))
    first = TextStream(train, seed=2)
    it = iter(first)
    assert [next(it) for _ in range(consumed)] == reference[:consumed]
    state = first.state_dict()
    resumed = TextStream(train, seed=2)
    resumed.load_state_dict(state)
    assert list(itertools.islice(resumed, 60)) == reference[consumed:]
    if consumed == 203:  # crossed into the second epoch
        assert state["positions"][0]["epoch"] == 1


def test_restore_with_dataloader_workers(tiny_shards_dir):
    train, _ = list_shards(tiny_shards_dir)
    reference = [doc for doc, _ in itertools.islice(_loader(WithState(TextStream(train, seed=7)), 2), 90)]
    latest = {}
    for i, (doc, state) in enumerate(_loader(WithState(TextStream(train, seed=7)), 2)):
        assert doc == reference[i]
        latest.update({k: state for k in state["positions"]})
        if i == 49:  # 50 items = 25 from each worker (the loader alternates workers)
            break
    resumed = TextStream(train, seed=7)
    resumed.load_state_dict(TextStream.merge_states(latest.values()))
    assert [doc for doc, _ in itertools.islice(_loader(WithState(resumed), 2), 40)] == reference[50:]


def test_state_mismatch_refused(tiny_shards_dir):
    train, _ = list_shards(tiny_shards_dir)
    state = TextStream(train, world_size=2).state_dict()
    with pytest.raises(SAELightningError, match="world_size=2"):
        TextStream(train, world_size=1).load_state_dict(state)
    with pytest.raises(SAELightningError, match="row_groups=26"):
        TextStream(train[:1], world_size=2).load_state_dict(state)
    # A position saved by 2 DataLoader workers cannot resume in a loader-less (1-reader) stream.
    _, state = next(iter(_loader(WithState(TextStream(train)), workers=2)))
    moved = TextStream(train)
    moved.load_state_dict(state)
    with pytest.raises(SAELightningError, match="2 DataLoader worker"):
        next(iter(moved))


def _assert_one_line(excinfo, text):
    assert "\n" not in str(excinfo.value) and text in str(excinfo.value)


def test_errors(tmp_path, tiny_shards_dir):
    with pytest.raises(SAELightningError) as excinfo:
        list_shards(tmp_path / "missing")
    _assert_one_line(excinfo, "does not exist")
    with pytest.raises(SAELightningError) as excinfo:
        list_shards(tmp_path)
    _assert_one_line(excinfo, "holds 0 parquet shard(s)")
    bad = tmp_path / "shard_00000.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), bad)
    with pytest.raises(SAELightningError) as excinfo:
        TextStream([bad])
    _assert_one_line(excinfo, "no 'text' column")
    with pytest.raises(SAELightningError) as excinfo:
        write_shards(["x"], tmp_path, docs_per_shard=1)
    _assert_one_line(excinfo, "already holds parquet shards")
    with pytest.raises(SAELightningError) as excinfo:
        write_shards([], tmp_path / "empty", docs_per_shard=1)
    _assert_one_line(excinfo, "no documents")
    with pytest.raises(SAELightningError):
        TextStream([])
    with pytest.raises(SAELightningError):
        TextStream([tmp_path / "nope.parquet"])
    # 13 row groups in the val shard, 16 looping readers: some would get nothing forever.
    _, val = list_shards(tiny_shards_dir)
    with pytest.raises(SAELightningError) as excinfo:
        list(TextStream([val], rank=15, world_size=16))
    _assert_one_line(excinfo, "gets no row group")


def test_write_shards_splits_and_leaves_no_temp_files(tmp_path):
    paths = write_shards((f"doc {i}" for i in range(25)), tmp_path, docs_per_shard=10, row_group_size=4)
    assert [p.name for p in paths] == [f"shard_0000{i}.parquet" for i in range(3)]
    assert [pq.ParquetFile(p).metadata.num_rows for p in paths] == [10, 10, 5]
    assert [pq.ParquetFile(p).metadata.num_row_groups for p in paths] == [3, 3, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]
    assert list(TextStream(paths, loop=False, shuffle=False)) == [f"doc {i}" for i in range(25)]
    assert torch.utils.data.get_worker_info() is None
