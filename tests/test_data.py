"""ActivationDataModule: packing, BOS dropping, scale, rank-disjoint streams, and exact resume of the buffer."""

import pytest
import torch

from saelightning.data import ActivationDataModule
from saelightning.errors import SAELightningError
from saelightning.nanochat.shards import TextStream, list_shards
from saelightning.tokens import TokenBatches
from tests.numerics import assert_close_reordered

pytestmark = pytest.mark.numerics  # fp32 results compared across code paths: also run under other CPU kernels

HOOKS = ["blocks.1.hook_resid_post", "blocks.0.mlp.hook_post"]


def _dm(model_dir, shards_dir, **kw):
    args = dict(model=str(model_dir), data_dir=str(shards_dir), context_size=32, batch_size=48, model_batch_rows=4,
                buffer_tokens=200, num_workers=0, val_batches=2, scale_batches=2)
    dm = ActivationDataModule(**{**args, **kw})
    dm.hooks = list(HOOKS)
    dm.setup("fit")
    return dm


def _take(iterable, n):
    it = iter(iterable)
    return [next(it) for _ in range(n)]


def test_token_batches_pack_documents_with_bos(nanochat_current_dir, tiny_shards_dir):
    dm = _dm(nanochat_current_dir, tiny_shards_dir)
    train, _ = list_shards(tiny_shards_dir)
    rows = torch.cat([b["tokens"].reshape(-1) for b in _take(TokenBatches(train, dm.tokenizer, 32, 4), 3)])
    expected = []
    for doc in TextStream(train):  # the same documents in the same order, each with BOS in front
        expected += dm.tokenizer.encode(doc, prepend_bos=True)
        if len(expected) >= len(rows):
            break
    assert rows.tolist() == expected[: len(rows)]
    assert rows[0].item() == dm.tokenizer.bos_id


def test_ranks_read_disjoint_documents(nanochat_current_dir, tiny_shards_dir):
    dm = _dm(nanochat_current_dir, tiny_shards_dir)
    train, _ = list_shards(tiny_shards_dir)
    bos = dm.tokenizer.bos_id

    def documents(rank):
        flat = torch.cat([b["tokens"].reshape(-1) for b in _take(TokenBatches(train, dm.tokenizer, 32, 4, rank, 2), 8)])
        starts = (flat == bos).nonzero().flatten().tolist()
        return {tuple(flat[a:b].tolist()) for a, b in zip(starts, starts[1:])}  # whole documents only

    docs0, docs1 = documents(0), documents(1)
    assert len(docs0) > 5 and len(docs1) > 5
    assert not docs0 & docs1


def test_activations_drop_bos_and_are_normalised(nanochat_current_dir, tiny_shards_dir):
    dm = _dm(nanochat_current_dir, tiny_shards_dir)
    train, val_shard = list_shards(tiny_shards_dir)
    val = [b["tokens"] for b in dm.val_dataloader()]
    # validation reads the val shard's first val_batches x model_batch_rows rows, in order (as `eval` does)
    docs = [t for d in TextStream([val_shard], loop=False, shuffle=False) for t in dm.tokenizer.encode(d)]
    assert [tuple(t.shape) for t in val] == [(4, 32), (4, 32)]
    assert torch.cat(val).flatten().tolist() == docs[:8 * 32]
    for tokens in val:
        acts = dm.capture(tokens)
        n_tokens = (tokens != dm.tokenizer.bos_id).sum().item()
        assert acts["blocks.1.hook_resid_post"].shape == (n_tokens, 64)
        assert acts["blocks.0.mlp.hook_post"].shape == (n_tokens, 256)  # the 4*d MLP hidden
    # the constant makes E||x||² = d_in on the batches it was estimated from (the stream's first ones)
    first = torch.cat([dm.capture(b["tokens"])["blocks.0.mlp.hook_post"]
                       for b in _take(TokenBatches(train, dm.tokenizer, 32, 4), 2)])
    assert first.pow(2).sum(-1).mean().item() == pytest.approx(256, rel=1e-4)
    # a fresh model forward on BOS-free positions gives the same (unscaled) activations
    tokens = val[0]
    raw = dm.model.run_with_cache(tokens, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
    keep = tokens.reshape(-1) != dm.tokenizer.bos_id
    torch.testing.assert_close(dm.capture(tokens)["blocks.1.hook_resid_post"],
                               raw.reshape(-1, 64)[keep] * dm.scales["blocks.1.hook_resid_post"])


@pytest.mark.parametrize("workers,stop", [(0, 3), (2, 7)])
def test_resume_reproduces_the_stream_bitwise(nanochat_current_dir, tiny_shards_dir, workers, stop):
    dm = _dm(nanochat_current_dir, tiny_shards_dir, num_workers=workers)
    stream = dm.train_dataloader()
    full = _take(stream, 10)  # several buffers of ~4 SAE batches each
    assert [b["index"] for b in full] == list(range(10))
    dm.on_after_batch_transfer(full[stop - 1], 0)  # training_step has seen batches 0..stop-1
    state = dm.state_dict()
    resumed = _dm(nanochat_current_dir, tiny_shards_dir, num_workers=workers)
    resumed.load_state_dict(state)
    for want, got in zip(full[stop:], _take(resumed.train_dataloader(), 10 - stop)):
        assert got["index"] == want["index"]
        for hook in HOOKS:
            assert torch.equal(got["acts"][hook], want["acts"][hook])


def test_resume_with_other_settings_is_refused(nanochat_current_dir, tiny_shards_dir):
    dm = _dm(nanochat_current_dir, tiny_shards_dir, num_workers=1)
    _take(dm.train_dataloader(), 2)
    state = dm.state_dict()
    other = _dm(nanochat_current_dir, tiny_shards_dir, num_workers=0)
    other.load_state_dict(state)
    with pytest.raises(SAELightningError, match="same data.num_workers"):
        _take(other.train_dataloader(), 1)
    with pytest.raises(SAELightningError, match="data.batch_size"):
        _dm(nanochat_current_dir, tiny_shards_dir, batch_size=24).load_state_dict(state)


def test_bad_settings_are_one_line_errors(nanochat_current_dir, tiny_shards_dir, tmp_path):
    with pytest.raises(SAELightningError, match="buffer_tokens"):
        ActivationDataModule(model=str(nanochat_current_dir), data_dir=str(tiny_shards_dir), batch_size=64,
                             buffer_tokens=32)
    with pytest.raises(SAELightningError, match="parquet shard"):  # at construction, before a trainer exists
        ActivationDataModule(model=str(nanochat_current_dir), data_dir=str(tmp_path))
    dm = ActivationDataModule(model=str(nanochat_current_dir), data_dir=str(tiny_shards_dir))
    dm.hooks = ["blocks.5.hook_resid_post"]
    with pytest.raises(SAELightningError, match="out of range"):
        dm.setup("fit")


def test_the_compiled_model_forward_gives_the_same_activations(nanochat_current_dir, tiny_shards_dir):
    """data.compile_model runs the truncated forward under torch.compile (Inductor); the activations, scale
    included, are the eager ones up to float rounding."""
    eager, compiled = _dm(nanochat_current_dir, tiny_shards_dir), _dm(nanochat_current_dir, tiny_shards_dir,
                                                                      compile_model=True)
    assert compiled._run_with_cache is not compiled.model.run_with_cache  # the compiled wrapper, not the method
    for dm in (eager, compiled):
        dm._ensure_scales()  # itself a pass of model batches through capture
    # a mean of squares over thousands of activations, each within the reordering bound: 1e-4 relative is loose
    assert compiled.scales == pytest.approx(eager.scales, rel=1e-4)
    for batch in _take(TokenBatches(list_shards(tiny_shards_dir)[0], eager.tokenizer, 32, 4), 2):
        want, got = eager.capture(batch["tokens"]), compiled.capture(batch["tokens"])
        for hook in HOOKS:  # fused kernels sum in another order: within the reordering bound of fp32
            assert_close_reordered(got[hook], want[hook], reduction_length=4 * 64, depth=2 * 4)
