"""Fixtures: a tiny tokenizer trained with rustbpe and a few parquet shards, both in nanochat's formats."""

import random

import pytest

from saelightning.nanochat.shards import write_shards
from saelightning.nanochat.tokenizer import save_tokenizer, train_tokenizer

TINY_VOCAB = 512  # 256 bytes + 247 merges + 9 specials
SHARD_DOCS = 100  # docs per shard in tiny_shards_dir (3 shards: 2 train, 1 val)
SHARD_ROW_GROUP = 8  # small row groups, so every rank x worker reader gets several

_WORDS = (
    "the a model layer token feature sparse autoencoder residual stream attention head neuron value key query "
    "learns reads writes returns computes predicts python function class import from self data list dict "
    "string number loss gradient step batch train eval latent decoder encoder weight bias norm scale shift "
    "small large first last next every each some many few often rarely quickly slowly clearly"
).split()
_CODE = [
    "def {a}_{b}(x, y=1):\n    return x + y * {n}\n",
    "class {A}{B}:\n    def __init__(self):\n        self.{a} = [{n}, {m}]\n",
    "for i in range({n}):\n    print('{a}', i)\n",
    "if {a} == {n}:\n    {b} = {{'{a}': {m}}}\n",
]


def tiny_texts(n: int = 400, seed: int = 0) -> list[str]:
    """Short deterministic documents: English-like sentences and Python-like snippets, numbered."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 30))]
        a, b = rng.choice(_WORDS), rng.choice(_WORDS)
        code = rng.choice(_CODE).format(a=a, b=b, A=a.title(), B=b.title(), n=rng.randint(0, 99), m=rng.randint(0, 99))
        docs.append(f"Document {i}. {' '.join(words).capitalize()}.\n\n{code}")
    return docs


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A nanochat tokenizer directory (tokenizer.pkl + token_bytes.pt), vocab 512, trained with rustbpe."""
    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(tiny_texts(), TINY_VOCAB), out)
    return out


@pytest.fixture(scope="session")
def tiny_shards_dir(tmp_path_factory):
    """Three nanochat parquet shards of 100 short documents each, row groups of 8 (last shard = val)."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(tiny_texts(3 * SHARD_DOCS, seed=1), out, docs_per_shard=SHARD_DOCS, row_group_size=SHARD_ROW_GROUP)
    return out
