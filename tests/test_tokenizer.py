"""Tokenizer: nanochat's format round-trips, and a hostile tokenizer.pkl is refused without running."""

import os
import pickle

import pytest
import tiktoken
import torch

from saelightning.errors import SAELightningError
from saelightning.nanochat.tokenizer import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    Tokenizer,
    load_encoding_bytes,
    load_token_bytes,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from tests.fixtures_data import TINY_VOCAB, tiny_texts


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


def test_round_trip_bos_and_specials(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    assert tok.vocab_size == TINY_VOCAB and tok.encoding.name == "rustbpe"
    assert tok.encoding._pat_str == SPLIT_PATTERN
    # The 9 specials sit at the end, in nanochat's order; bos is the first of them.
    n_regular = TINY_VOCAB - len(SPECIAL_TOKENS)
    assert [tok.encode_special(name) for name in SPECIAL_TOKENS] == list(range(n_regular, TINY_VOCAB))
    assert tok.bos_id == n_regular
    text = "Document 7. The sparse model learns — ünïcode ✓ too.\ndef f(x):\n    return x\n"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
    assert tok.decode(ids[1:]) == text
    assert tok.encode(text, prepend_bos=False) == ids[1:]
    # Merges were learned: common words take fewer tokens than bytes.
    assert len(tok.encode("the model learns", prepend_bos=False)) < len("the model learns") / 2
    assert tok.encode_batch([text, "model"]) == [ids, tok.encode("model")]
    # Special-looking text in a document is ordinary text, as in nanochat (encode_ordinary).
    assert tok.bos_id not in tok.encode("<|bos|>", prepend_bos=False)


def test_token_str_and_token_bytes(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    saved = load_token_bytes(tiny_tokenizer_dir)
    assert saved.dtype == torch.int32 and saved.shape == (TINY_VOCAB,)
    assert torch.equal(saved, tok.token_bytes())
    assert saved[ord("a")] == 1 and saved[-len(SPECIAL_TOKENS):].eq(0).all()
    merged = tok.encode(" model", prepend_bos=False)
    assert len(merged) == 1 and tok.token_str(merged[0]) == " model" and saved[merged[0]] == 6
    assert tok.token_str(tok.bos_id) == "<|bos|>"
    assert tok.token_str(0xC3) == "\ufffd"  # a lone lead byte is shown, not raised
    # nanochat counts a lone byte >= 128 as the 3 bytes of U+FFFD; we write the same numbers.
    assert saved[0xC3] == 3


def test_saved_pickle_is_nanochat_format(tiny_tokenizer_dir):
    # nanochat's own loader is a plain pickle.load: the file must give a working tiktoken Encoding.
    with open(tiny_tokenizer_dir / "tokenizer.pkl", "rb") as f:
        enc = pickle.load(f)
    assert isinstance(enc, tiktoken.Encoding) and enc.n_vocab == TINY_VOCAB
    assert enc.encode_ordinary("the model") == load_tokenizer(tiny_tokenizer_dir).encode("the model", prepend_bos=False)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_pickle_protocol_loads(tiny_tokenizer_dir, protocol):
    enc = load_tokenizer(tiny_tokenizer_dir).encoding
    again = load_encoding_bytes(pickle.dumps(enc, protocol=protocol))
    assert again._mergeable_ranks == enc._mergeable_ranks and again._special_tokens == enc._special_tokens


class _Payload:
    """Unpickling this runs os.system: the restricted unpickler must refuse it before that happens."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    bad_dir = tmp_path / "tok"
    bad_dir.mkdir()
    (bad_dir / "tokenizer.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control")))  # the payload is real: plain pickle runs it
    assert (tmp_path / "control").exists()
    with pytest.raises(SAELightningError) as excinfo:
        load_tokenizer(bad_dir)
    assert f"{os.system.__module__}.system" in _one_line_error(excinfo)
    assert not marker.exists()


def test_payload_inside_encoding_state_refused():
    # The allowed tiktoken.core.Encoding global, with an eval() hidden in the state it is built from.
    class Sneaky:
        def __reduce__(self):
            return (eval, ("__import__('os').getcwd()",))

    state = {"name": "x", "pat_str": r"\w+", "mergeable_ranks": {b"a": 0}, "special_tokens": {"<|bos|>": Sneaky()}}

    class FakeEncoding:
        def __reduce__(self):
            return (tiktoken.core.Encoding, (), state)

    with pytest.raises(SAELightningError) as excinfo:
        load_encoding_bytes(pickle.dumps(FakeEncoding()))
    assert "builtins.eval" in _one_line_error(excinfo)


def test_registry_name_state_refused():
    # tiktoken's own __setstate__ would fetch a named encoding from the network; we refuse the state.
    class NamedEncoding:
        def __reduce__(self):
            return (tiktoken.core.Encoding, (), "cl100k_base")

    with pytest.raises(SAELightningError) as excinfo:
        load_encoding_bytes(pickle.dumps(NamedEncoding()))
    assert "Encoding state" in _one_line_error(excinfo)


def test_corrupt_and_wrong_content(tmp_path, tiny_tokenizer_dir):
    data = (tiny_tokenizer_dir / "tokenizer.pkl").read_bytes()
    with pytest.raises(SAELightningError) as excinfo:
        load_encoding_bytes(data[: len(data) // 2])
    assert "not a readable pickle" in _one_line_error(excinfo)
    with pytest.raises(SAELightningError) as excinfo:
        load_encoding_bytes(pickle.dumps({"name": "rustbpe"}))
    assert "does not contain a tiktoken Encoding" in _one_line_error(excinfo)


def test_missing_dir_and_file(tmp_path):
    with pytest.raises(SAELightningError) as excinfo:
        load_tokenizer(tmp_path / "nope")
    assert "does not exist" in _one_line_error(excinfo)
    with pytest.raises(SAELightningError) as excinfo:
        load_tokenizer(tmp_path)
    assert "no tokenizer.pkl" in _one_line_error(excinfo)
    with pytest.raises(SAELightningError):
        load_token_bytes(tmp_path)


def test_train_errors_and_save_from_encoding(tmp_path):
    with pytest.raises(SAELightningError) as excinfo:
        train_tokenizer(["abc"], 200)
    assert "at least 265" in _one_line_error(excinfo)
    with pytest.raises(SAELightningError) as excinfo:
        train_tokenizer(["ab ab"], 300)  # one distinct pair: far fewer merges than asked
    assert "merges" in _one_line_error(excinfo)
    tok = train_tokenizer(tiny_texts(100), 300)
    save_tokenizer(tok.encoding, tmp_path)  # a bare Encoding is accepted too
    assert load_tokenizer(tmp_path / "tokenizer.pkl").encoding._mergeable_ranks == tok.encoding._mergeable_ranks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token_bytes.pt", "tokenizer.pkl"]  # no temp files left


def test_tokenizer_needs_bos():
    enc = tiktoken.Encoding(name="x", pat_str=r"\w+", mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={})
    with pytest.raises(SAELightningError):
        Tokenizer(enc)
