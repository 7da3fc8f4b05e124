"""What a command or config names, turned into things: "demo", model paths, shard dirs, exported SAEs.

The one place that knows that "demo" is the bundled model and its stdlib shards, where nanochat keeps
its shards, and what a missing tokenizer or hook name means, so that every command says it the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from saelightning.demo import DEMO_MODEL_DIR, demo_conversations, ensure_demo_shards
from saelightning.errors import SAELightningError
from saelightning.export import load_sae, read_metadata
from saelightning.nanochat.checkpoint import Nanochat, load_nanochat
from saelightning.nanochat.shards import list_shards
from saelightning.tokens import ChatMix


@dataclass
class ModelSource:
    """One of the models a crosscoder reads (data.models).

    Args:
        name: what the model is called in hook keys ("<name>/<hook>"), logs and exports (e.g. base, chat).
        path: a nanochat checkpoint dir, model_XXXXXX.pt or base dir, or "demo" (default: data.model).
        source: the stage folder of a base dir: base | mid | sft | rl.
        step: the checkpoint step (default: the latest).
        model_tag: the base dir's model folder (default: the deepest d*).
        era: "original" | "current" to override the era detected from the checkpoint's keys.
    """

    name: str = "base"
    path: str | None = None
    source: str = "base"
    step: int | None = None
    model_tag: str | None = None
    era: str | None = None


MODEL_KEY = re.compile(r"^([A-Za-z0-9_\-]+)/(.+)$")


def split_key(key: str) -> tuple[str | None, str]:
    """"chat/blocks.2.hook_resid_post" -> ("chat", "blocks.2.hook_resid_post"); a plain hook -> (None, hook)."""
    match = MODEL_KEY.match(key)
    return (match.group(1), match.group(2)) if match else (None, key)


def as_source(value, index: int) -> ModelSource:
    if isinstance(value, ModelSource):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(ModelSource)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise SAELightningError(f"data.models[{index}] has no field(s) {unknown}; its fields are {sorted(known)}")
        return ModelSource(**value)
    raise SAELightningError(f"data.models[{index}] must be a mapping of ModelSource fields, got {type(value).__name__}")


def tokenizer_fingerprint(tokenizer) -> str:
    """What makes two tokenizers the same: the split pattern, every merge and the special tokens."""
    enc = tokenizer.encoding
    digest = hashlib.sha256(enc._pat_str.encode())
    for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
        digest.update(rank.to_bytes(4, "little") + token)
    digest.update(repr(sorted(enc._special_tokens.items())).encode())
    return digest.hexdigest()[:16]


def check_same_family(loaded: list[tuple[str, object]]) -> None:
    """Models a crosscoder can read together: one tokenizer, one width, one vocabulary (one-line errors)."""
    (first, ref), rest = loaded[0], loaded[1:]
    for name, other in rest:
        for what, a, b in (("width (n_embd)", ref.model.d_model, other.model.d_model),
                           ("vocabulary size", ref.model.config.vocab_size, other.model.config.vocab_size)):
            if a != b:
                raise SAELightningError(f"data.models: {name!r} ({other.meta['path']}) has {what} {b} but {first!r} "
                                        f"has {a}; a crosscoder reads models of one family: give checkpoints of one "
                                        "nanochat run (one tokenizer, one width)")
        if tokenizer_fingerprint(ref.tokenizer) != tokenizer_fingerprint(other.tokenizer):
            raise SAELightningError(f"data.models: {name!r} ({other.meta['path']}) has another tokenizer than "
                                    f"{first!r}; the models must read the same tokens: give checkpoints of one "
                                    "nanochat run (one tokenizer/ directory)")


def load_models(models: Sequence, default_path: str | None, device=None) -> tuple[list[ModelSource], list[Nanochat]]:
    """data.models (or `saelightning cache --models`): each entry a ModelSource (path defaulting to
    `default_path`), loaded and checked to be one family; the sources come back with their paths filled in."""
    sources = [as_source(m, i) for i, m in enumerate(models)]
    names = [s.name for s in sources]
    if len(sources) < 2 or len(set(names)) != len(names) or not all(re.fullmatch(r"[A-Za-z0-9_\-]+", n)
                                                                      for n in names):
        raise SAELightningError(f"data.models needs two or more models with distinct names of letters, digits, _ "
                                f"and - (got {names}); a crosscoder diffs them")
    loaded = []
    for src in sources:
        path = src.path or default_path
        if path is None:
            raise SAELightningError(f"data.models: {src.name!r} has no path and data.model is null; give its path")
        loaded.append((src.name, load_model(path, device=device, step=src.step, era=src.era, source=src.source,
                                            model_tag=src.model_tag)))
        src.path = path
    check_same_family(loaded)
    return sources, [n for _, n in loaded]


def models_info(sources: Sequence[ModelSource], loaded: Sequence[Nanochat]) -> list[dict]:
    """What an export or a cache manifest names of each model: name, path, stage, step, era, config."""
    return [{"name": s.name, "path": n.meta["path"], "stage": s.source, "step": n.meta["step"], "era": n.meta["era"],
             "config": n.meta["model_config"]} for s, n in zip(sources, loaded)]


def model_path(model: str) -> str:
    """'demo' -> the bundled model's directory; anything else is a path the user gave."""
    return str(DEMO_MODEL_DIR) if model == "demo" else model


def load_model(model: str, device=None, dtype=None, step: int | None = None, era: str | None = None,
               source: str = "base", model_tag: str | None = None) -> Nanochat:
    """A frozen nanochat model with its tokenizer (refused without one: every command needs it)."""
    nanochat = load_nanochat(model_path(model), step=step, era=era, device=device, dtype=dtype, source=source,
                             model_tag=model_tag)
    if nanochat.tokenizer is None:
        raise SAELightningError(f"no tokenizer/ found above {nanochat.meta['path']}; put nanochat's tokenizer/ "
                                "directory in the nanochat base dir, beside base_checkpoints/")
    return nanochat


def device(name: str | None) -> torch.device:
    """--device, default cuda when there is a GPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _is_demo(model: str) -> bool:
    """"demo", or a path to the bundled model (its dir or one inside it)."""
    if model == "demo":
        return True
    try:
        path = Path(model).expanduser().resolve()
    except OSError:
        return False
    return path == DEMO_MODEL_DIR.resolve() or DEMO_MODEL_DIR.resolve() in path.parents


def data_dir(data: str | None, model: str) -> Path:
    """The shard directory: `data`, the demo shards ("demo", or by default for the demo model), or
    nanochat's base_data next to $NANOCHAT_BASE_DIR."""
    if data == "demo" or (data is None and _is_demo(model)):
        return Path(ensure_demo_shards())
    if data is not None:
        return Path(data).expanduser()
    base = Path(os.environ.get("NANOCHAT_BASE_DIR", Path.home() / ".cache" / "nanochat"))
    for name in ("base_data_climbmix", "base_data"):
        if (base / name).is_dir():
            return base / name
    raise SAELightningError(f"no --data given and no base_data under {base}; pass --data DIR (parquet shards)")


def conversations(chat: str) -> list[list[dict]]:
    """data.chat: "demo" (the stdlib docstring questions the demo's chat stage is tuned on) or a JSONL file, one
    conversation a line: a list of {"role": "user" | "assistant", "content": str} turns (nanochat's CustomJSON
    format), or an object with that list under "messages"."""
    if chat == "demo":
        return demo_conversations()
    path = Path(chat).expanduser()
    if not path.is_file():
        raise SAELightningError(f"data.chat {chat!r} is not a file; give a JSONL file of conversations or \"demo\"")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SAELightningError(f"{path}:{number} is not JSON ({exc.msg}); write one conversation a line") from None
        turns = item.get("messages") if isinstance(item, dict) else item
        if not (isinstance(turns, list) and turns and all(isinstance(t, dict) and isinstance(t.get("content"), str)
                                                          for t in turns)):
            raise SAELightningError(f"{path}:{number} is not a conversation; write a list of "
                                    '{"role": "user"|"assistant", "content": "..."} turns')
        out.append(turns)
    return out


def crosscoder_models(cc, sae_path, paths: Sequence | None, device=None) -> tuple[list[dict], list[Nanochat]]:
    """The models a crosscoder reads, in its order: the ones its cfg.json records (name, path, step, era), or
    `paths` (--models) where they moved; each checked to be of the width it reads."""
    recorded = cc.metadata.get("models") or []
    if paths is not None and len(paths) != cc.n_models:
        raise SAELightningError(f"--models gives {len(paths)} model(s) but the crosscoder reads {cc.n_models}; "
                                "give one checkpoint per model, in its order")
    if paths is None and len(recorded) != cc.n_models:
        raise SAELightningError(f"{sae_path}'s cfg.json names no models (metadata.models); pass --models, one "
                                "checkpoint dir per model in the crosscoder's order")
    infos, loaded = [], []
    for i in range(cc.n_models):
        info = dict(recorded[i]) if i < len(recorded) else {"name": f"model{i}"}
        path = paths[i] if paths is not None else info.get("path")
        if paths is None and not Path(path).exists():
            raise SAELightningError(f"{sae_path} was trained on {info.get('name')!r} at {path}, which is not there "
                                    "now; pass --models with where the models are now")
        step = info.get("step") if paths is None else None
        nc = load_model(path, device=device, dtype=torch.float32, step=step, era=info.get("era"))
        if nc.model.d_model != cc.d_model:
            raise SAELightningError(f"model {path} has width {nc.model.d_model}, the crosscoder reads {cc.d_model}; "
                                    "give the models it was trained on")
        infos.append({**info, "path": str(path), "step": nc.meta["step"]})
        loaded.append(nc)
    return infos, loaded


def val_chat(tokenizer, sae_paths: Sequence, chat: str | None, fraction: float | None) -> ChatMix | None:
    """The held-out conversations mixed into a command's val rows: --chat / --chat_fraction when given, else the
    data.chat and data.chat_fraction the (first) SAE was trained with; None without a mix."""
    recorded = _recorded(read_metadata(sae_paths[0])) if sae_paths else {}
    chat = chat if chat is not None else recorded.get("chat")
    fraction = fraction if fraction is not None else float(recorded.get("chat_fraction") or 0)
    if not fraction:
        return None
    if chat is None:
        raise SAELightningError(f"--chat_fraction {fraction} but the SAE records no data.chat; pass --chat (a JSONL "
                                "file of conversations, or demo)")
    return ChatMix.render(tokenizer, conversations(chat), fraction, "val", source=chat)


def shards(data: str | os.PathLike) -> tuple[list[Path], Path]:
    """(train shards, val shard) of a shard directory, or of the demo shards for "demo"."""
    return list_shards(ensure_demo_shards() if str(data) == "demo" else data)


def sae_hook(sae, path) -> str:
    """The hook point an exported SAE reads (cfg.json metadata.hook_name)."""
    hook = (getattr(sae, "metadata", None) or {}).get("hook_name")
    if not hook:
        raise SAELightningError(f"{path}: cfg.json metadata has no hook_name; re-export the SAE with it")
    return hook


def load_saes(paths: Sequence, device=None) -> tuple[dict[str, list], list[tuple[str, int]]]:
    """Exported SAEs grouped by hook point; also each path's (hook, index in its group)."""
    groups, where = {}, []
    for path in paths:
        sae = load_sae(path, device=device).eval()
        hook = sae_hook(sae, path)
        groups.setdefault(hook, []).append(sae)
        where.append((hook, len(groups[hook]) - 1))
    return groups, where


def _recorded(metadata: dict) -> dict:
    """What an export records of the model and data it was trained on (exports before trained_on: the
    checkpoint dir and step only)."""
    trained_on = metadata.get("trained_on")
    if isinstance(trained_on, dict) and trained_on.get("model"):
        return trained_on
    model = metadata.get("model") if isinstance(metadata.get("model"), dict) else {}
    return {"model": model.get("path"), "step": model.get("step"), "era": model.get("era")}


def sources(sae_paths: Sequence, model: str | None, data: str | None) -> tuple[str, dict, str | None]:
    """(model, load_model keywords, data) for a command on exported SAEs: --model and --data when given,
    else what the SAEs' cfg.json records (the model, its step, and the shards whose last one is val)."""
    if model is not None:
        return model, {}, data
    if not sae_paths:
        raise SAELightningError("no --model given and no --sae to take it from; pass --model DIR (or demo)")
    recorded = {}
    for path in sae_paths:
        rec = _recorded(read_metadata(path))
        if not rec.get("model"):
            raise SAELightningError(f"{path}: cfg.json records no model; pass --model DIR (the nanochat checkpoint "
                                    "it was trained on)")
        recorded.setdefault((rec["model"], rec.get("step")), (path, rec))
    if len(recorded) > 1:
        (a, _), (b, _) = list(recorded.values())[:2]
        raise SAELightningError(f"the SAEs were trained on different models ({a} and {b}); pass --model to "
                                "evaluate them on one")
    path, rec = next(iter(recorded.values()))
    if rec["model"] != "demo" and not Path(rec["model"]).exists():
        raise SAELightningError(f"{path} was trained on the model at {rec['model']}, which is not there now; pass "
                                "--model DIR (where it is now)")
    keywords = {k: rec[k] for k in ("step", "era", "source", "model_tag") if rec.get(k) is not None}
    if data is None and rec.get("data"):
        data = rec["data"]
        if data != "demo" and not Path(data).is_dir():
            raise SAELightningError(f"{path} was trained on the shards in {data}, which are not there now; pass "
                                    "--data DIR (its last shard is the val split)")
    return rec["model"], keywords, data
