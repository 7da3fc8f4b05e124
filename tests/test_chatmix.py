"""Chat conversations mixed into the text (data.chat, data.chat_fraction): the share in tokens, whole conversations
in nanochat's format, the held-out split, exact resume of the mixed stream, the regions diff reports, bad input."""

import json
import re

import pytest
import torch

from saelightning import resolve
from saelightning.errors import SAELightningError
from saelightning.nanochat.tokenizer import load_tokenizer
from saelightning.tokens import ChatMix, Packer, TokenBatches, chat_regions, val_batches
from tests.fixtures_data import tiny_texts


def _conversations(n=40):
    return [[{"role": "user", "content": f"what is {i} plus {i}?"},
             {"role": "assistant", "content": f"{i} plus {i} is {2 * i}" + " indeed" * (i % 5)}] for i in range(n)]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def test_the_mix_is_exact_in_tokens_and_packs_whole_conversations_in_order(tok):
    conversations = _conversations()
    mix = ChatMix.render(tok, conversations, 0.3, "train", seed=0)
    train = [c for i, c in enumerate(conversations) if i % 10]
    assert len(mix.conversations) == len(train) == 36
    assert sorted(mix.conversations) == sorted(tok.render_conversation(c)[0] for c in train)  # a permutation
    packer = Packer(tok, 32, chat=mix)
    rows = packer.rows(iter(tiny_texts(200)), 40)
    stream = [t for r in rows for t in r] + packer.carry
    taken, chat_tokens, tokens = packer.mixed
    assert tokens == len(stream) and taken >= 5
    longest = max(len(ids) for ids in mix.conversations)
    assert abs(chat_tokens - 0.3 * tokens) <= longest  # the share is held to within one conversation
    # the conversations appear whole, in the permuted order, each starting at a <|bos|>
    bos = [i for i, t in enumerate(stream) if t == tok.bos_id]
    docs = [stream[a:b] for a, b in zip(bos, bos[1:] + [len(stream)])]
    assert [d for d in docs if d in mix.conversations] == mix.conversations[:taken]
    region, marker = chat_regions(torch.tensor(stream), tok)
    assert int((region > 0).sum()) == chat_tokens - taken  # every conversation token but its <|bos|>
    assert int(marker.sum()) == 4 * taken
    ids = mix.conversations[0]  # <|bos|> user turn, assistant turn
    start = bos[docs.index(ids)]
    user_end = ids.index(tok.encode_special("<|user_end|>"))
    assert region[start].item() == 0 and set(region[start + 1:start + user_end + 1].tolist()) == {1}
    assert set(region[start + user_end + 1:start + len(ids)].tolist()) == {2}


def test_a_fraction_of_one_packs_conversations_only(tok):
    mix = ChatMix.render(tok, _conversations(), 1.0, "val")  # the 4 held-out ones, cycled in order
    packer = Packer(tok, 32, chat=mix)
    rows = packer.rows(iter(tiny_texts(50)), 10)
    stream = [t for r in rows for t in r] + packer.carry
    taken, chat_tokens, tokens = packer.mixed
    assert len(rows) == 10 and chat_tokens == tokens == len(stream) and taken > len(mix.conversations)
    assert stream == [t for i in range(taken) for t in mix.conversations[i % len(mix.conversations)]]


def test_validation_reads_the_held_out_tenth_in_order(tok, tiny_shards_dir):
    conversations = _conversations()
    mix = ChatMix.render(tok, conversations, 0.5, "val")
    assert mix.conversations == [tok.render_conversation(c)[0] for c in conversations[::10]]
    _, val = resolve.shards(tiny_shards_dir)
    plain = torch.cat(list(val_batches(val, tok, 32, 20, 4)))
    mixed = torch.cat(list(val_batches(val, tok, 32, 20, 4, chat=mix)))
    again = torch.cat(list(val_batches(val, tok, 32, 20, 4, chat=mix)))
    assert torch.equal(mixed, again) and not torch.equal(plain, mixed)
    assert int(chat_regions(mixed, tok)[1].sum()) > 0


def test_the_mixed_stream_resumes_exactly(tok, tiny_shards_dir):
    mix = ChatMix.render(tok, _conversations(), 0.4, "train", seed=3)
    train, _ = resolve.shards(tiny_shards_dir)
    whole = iter(TokenBatches(train, tok, 32, 4, seed=1, chat=mix))
    first = [next(whole) for _ in range(7)]
    rest = [next(whole)["tokens"] for _ in range(6)]
    resumed = iter(TokenBatches(train, tok, 32, 4, seed=1, chat=mix, start={"workers": {0: first[-1]["state"]}}))
    for expected in rest:
        assert torch.equal(next(resumed)["tokens"], expected)
    # two readers (ranks) take disjoint strides of the conversations
    a, b = (Packer(tok, 32, chat=mix, reader=r, readers=2) for r in (0, 1))
    for p in (a, b):
        p.rows(iter(tiny_texts(100)), 30)
    assert a.mixed[0] > 1 and a.chat.conversations[0] != b.chat.conversations[1]


def test_bad_chat_input_gets_one_line(tmp_path, nanochat_current_dir, tiny_shards_dir):
    from saelightning.data import ActivationDataModule

    for kwargs, fragment in (({"chat_fraction": 0.2}, "data.chat is null"),
                             ({"chat": "demo", "chat_fraction": 1.5}, "must be in [0, 1]"),
                             ({"chat": "demo", "chat_fraction": 0.2, "activations": str(tmp_path)},
                              "data.activations")):
        with pytest.raises(SAELightningError, match="^[^\n]*" + re.escape(fragment)):
            ActivationDataModule(model=str(nanochat_current_dir), data_dir=str(tiny_shards_dir), **kwargs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_conversations(1)[0]) + "\n{not json\n")
    with pytest.raises(SAELightningError, match=r"bad.jsonl:2 is not JSON"):
        resolve.conversations(str(bad))
    bad.write_text(json.dumps({"messages": "hi"}) + "\n")
    with pytest.raises(SAELightningError, match=r"bad.jsonl:1 is not a conversation"):
        resolve.conversations(str(bad))
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(c if i % 2 else {"messages": c}) for i, c in enumerate(_conversations(3))))
    assert resolve.conversations(str(good)) == _conversations(3)
