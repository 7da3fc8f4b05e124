"""nanochat's tokenizer: a tiktoken Encoding trained with rustbpe, stored as tokenizer.pkl.

tokenizer.pkl is a pickle, and a pickle can run any code on load. We never hand it to pickle.load:
a restricted unpickler maps the one class it references (tiktoken.core.Encoding) to an inert
record of the pickled state, refuses every other global, and we build the Encoding ourselves from
the checked state. No code from the file runs, not even tiktoken's own __setstate__ (which would
fetch a registry encoding by name from the network if the state were a string).
"""

from __future__ import annotations

import codecs
import copyreg
import io
import os
import pickle
from collections.abc import Iterable
from pathlib import Path

import tiktoken
import torch

from saelightning.atomic import atomic_file
from saelightning.errors import SAELightningError

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with it; also the document delimiter in packed rows
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]

# GPT-4's split pattern with \p{N}{1,2} instead of {1,3}, as nanochat uses it.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

TOKENIZER_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"


class Tokenizer:
    """A tiktoken Encoding with nanochat's conventions: encode_ordinary, <|bos|> prepended."""

    def __init__(self, encoding: tiktoken.Encoding, num_threads: int = 2):
        if "<|bos|>" not in encoding.special_tokens_set:
            raise SAELightningError(
                f"tokenizer {encoding.name!r} has no <|bos|> special token; use a nanochat tokenizer.pkl"
            )
        self._enc = encoding
        self._bos = encoding.encode_single_token("<|bos|>")
        self.num_threads = num_threads  # tiktoken's batch encode threads (the CPU is shared with the model)

    @property
    def encoding(self) -> tiktoken.Encoding:
        return self._enc

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def bos_id(self) -> int:
        return self._bos

    def encode(self, text: str, prepend_bos: bool = True) -> list[int]:
        ids = self._enc.encode_ordinary(text)
        return [self._bos, *ids] if prepend_bos else ids

    def encode_batch(self, texts: Iterable[str], prepend_bos: bool = True) -> list[list[int]]:
        rows = self._enc.encode_ordinary_batch(list(texts), num_threads=self.num_threads)
        return [[self._bos, *ids] for ids in rows] if prepend_bos else rows

    def encode_special(self, name: str) -> int:
        try:
            return self._enc.encode_single_token(name)
        except KeyError:
            raise SAELightningError(
                f"{name!r} is not a special token of this tokenizer; it has {sorted(self._enc.special_tokens_set)}"
            ) from None

    def render_conversation(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """nanochat's chat format: <|bos|>, then each turn as <|user_start|> text <|user_end|> or
        <|assistant_start|> text <|assistant_end|>. Returns (ids, mask), mask 1 on the tokens an SFT loss trains
        on (the assistant's text and its <|assistant_end|>), as nanochat's render_conversation marks them."""
        ids, mask = [self._bos], [0]
        for message in messages:
            role = message.get("role")
            if role not in ("user", "assistant"):
                raise SAELightningError(f"a conversation turn has role {role!r}; use 'user' or 'assistant'")
            start, end = self.encode_special(f"<|{role}_start|>"), self.encode_special(f"<|{role}_end|>")
            text = self._enc.encode_ordinary(message.get("content", ""))
            train = int(role == "assistant")
            ids += [start, *text, end]
            mask += [0] + [train] * (len(text) + 1)
        return ids, mask

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def token_str(self, token_id: int) -> str:
        # One token may be part of a multi-byte character: show U+FFFD rather than fail.
        return self._enc.decode_single_token_bytes(int(token_id)).decode("utf-8", errors="replace")

    def token_bytes(self) -> torch.Tensor:
        """int32 [vocab]: UTF-8 length of each token's decoded text, 0 for specials (nanochat's bpb weights)."""
        specials = self._enc.special_tokens_set
        lengths = []
        for token_id in range(self.vocab_size):
            # nanochat decodes each token alone (a partial character becomes U+FFFD, 3 bytes): same here.
            text = self._enc.decode([token_id])
            lengths.append(0 if text in specials else len(text.encode("utf-8")))
        return torch.tensor(lengths, dtype=torch.int32)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(name={self._enc.name!r}, vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------------------------
# Loading tokenizer.pkl safely


class _PickledEncoding:
    """Stands in for tiktoken.core.Encoding while unpickling: it only records the pickled state."""

    def __setstate__(self, state):
        self.state = state


# The only globals a pickled Encoding references, at any protocol (0-2 add the copyreg helpers and
# _codecs.encode for bytes). Python-2 spellings appear in protocol 0-2 files.
_ALLOWED_GLOBALS = {
    ("tiktoken.core", "Encoding"): _PickledEncoding,
    ("copyreg", "_reconstructor"): copyreg._reconstructor,
    ("copy_reg", "_reconstructor"): copyreg._reconstructor,
    ("builtins", "object"): object,
    ("__builtin__", "object"): object,
    ("_codecs", "encode"): codecs.encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise SAELightningError(
                f"tokenizer.pkl references the global {module}.{name}, which a nanochat tokenizer never does; "
                "refusing to load it (only tiktoken.core.Encoding is allowed)"
            ) from None

    def persistent_load(self, pid):
        raise SAELightningError("tokenizer.pkl uses persistent ids, which a nanochat tokenizer never does; refusing it")


def _check_state(state, where: str) -> dict:
    expected = {"name": str, "pat_str": str, "mergeable_ranks": dict, "special_tokens": dict}
    if not isinstance(state, dict) or set(state) != set(expected):
        raise SAELightningError(
            f"{where} does not hold a tiktoken Encoding state (keys {sorted(expected)}); "
            "re-save it with nanochat's tokenizer"
        )
    for key, kind in expected.items():
        if not isinstance(state[key], kind):
            raise SAELightningError(f"{where}: Encoding field {key!r} is {type(state[key]).__name__}, "
                                    f"expected {kind.__name__}")
    ranks_ok = all(isinstance(k, bytes) and type(v) is int for k, v in state["mergeable_ranks"].items())
    specials_ok = all(isinstance(k, str) and type(v) is int for k, v in state["special_tokens"].items())
    if not (ranks_ok and specials_ok):
        raise SAELightningError(f"{where}: mergeable_ranks must map bytes->int and special_tokens str->int")
    return state


def load_encoding_bytes(data: bytes, where: str = "tokenizer.pkl") -> tiktoken.Encoding:
    """Rebuild a tiktoken Encoding from pickle bytes without running any code they contain."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except SAELightningError:
        raise
    except Exception as exc:  # truncated or corrupt file
        raise SAELightningError(f"{where} is not a readable pickle ({type(exc).__name__}: {exc}); "
                                "re-save the tokenizer") from None
    if not isinstance(obj, _PickledEncoding) or not hasattr(obj, "state"):
        raise SAELightningError(f"{where} does not contain a tiktoken Encoding (found {type(obj).__name__}); "
                                "use nanochat's tokenizer.pkl")
    state = _check_state(obj.state, where)
    try:
        return tiktoken.Encoding(**state)
    except Exception as exc:  # e.g. special ids colliding with merge ranks, or a bad regex
        raise SAELightningError(f"{where}: tiktoken rejected the Encoding ({exc})") from None


def load_tokenizer(tokenizer_dir: str | os.PathLike) -> Tokenizer:
    """Load nanochat's tokenizer/ directory (or the tokenizer.pkl path itself)."""
    path = Path(tokenizer_dir).expanduser()
    pkl = path if path.suffix == ".pkl" else path / TOKENIZER_FILE
    if not path.exists():
        raise SAELightningError(f"tokenizer directory {path} does not exist; "
                                "pass nanochat's <base>/tokenizer directory")
    if not pkl.is_file():
        raise SAELightningError(f"no {TOKENIZER_FILE} in {path}; "
                                "pass the directory that holds nanochat's tokenizer.pkl")
    return Tokenizer(load_encoding_bytes(pkl.read_bytes(), where=str(pkl)))


# ---------------------------------------------------------------------------------------------
# Writing and training


def save_tokenizer(tokenizer: Tokenizer | tiktoken.Encoding, tokenizer_dir: str | os.PathLike) -> Path:
    """Write tokenizer.pkl (pickle.dump of the Encoding, as nanochat does) and token_bytes.pt."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    out = Path(tokenizer_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / TOKENIZER_FILE) as f:
        pickle.dump(tok.encoding, f)
    token_bytes = tok.token_bytes()
    with atomic_file(out / TOKEN_BYTES_FILE) as f:
        torch.save(token_bytes, f)
    return out


def load_token_bytes(tokenizer_dir: str | os.PathLike) -> torch.Tensor:
    """token_bytes.pt of a tokenizer directory (int32 [vocab]), loaded with weights_only=True."""
    path = Path(tokenizer_dir).expanduser() / TOKEN_BYTES_FILE
    if not path.is_file():
        raise SAELightningError(f"no {TOKEN_BYTES_FILE} in {path.parent}; "
                                "nanochat's tok_train writes it beside tokenizer.pkl")
    return torch.load(path, map_location="cpu", weights_only=True)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a nanochat tokenizer with rustbpe: 256 byte tokens, merges, then the 9 special tokens."""
    try:
        import rustbpe
    except ImportError:
        raise SAELightningError("training a tokenizer needs rustbpe; install it with `pip install rustbpe`") from None
    n_regular = vocab_size - len(SPECIAL_TOKENS)
    if n_regular < 256:
        raise SAELightningError(f"vocab_size {vocab_size} is too small; "
                                f"it must be at least {256 + len(SPECIAL_TOKENS)}")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), n_regular, pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    if len(ranks) != n_regular:
        raise SAELightningError(
            f"the text allowed only {len(ranks) - 256} merges, {n_regular - 256} were asked for; "
            "give more text or a smaller vocab_size"
        )
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    encoding = tiktoken.Encoding(
        name="rustbpe", pat_str=trainer.get_pattern(), mergeable_ranks=ranks, special_tokens=specials
    )
    return Tokenizer(encoding)
