"""Build the bundled demo model: checkpoints/nanochat-demo (a tokenizer and a 4-layer nanochat).

Trains, on CPU in fp32, a current-era nanochat on the Python standard library (saelightning.demo):
a rustbpe tokenizer (vocab 4096) on the train shards, then the model on random 256-token windows of
the tokenized train shards, and measures val bpb on the last shard as nanochat does. The output is
in nanochat's own layout, so load_nanochat (and nanochat itself) reads it:
    <out>/tokenizer/{tokenizer.pkl, token_bytes.pt}
    <out>/base_checkpoints/d4/{model_XXXXXX.pt, meta_XXXXXX.json}
Optimizer: AdamW only (nanochat uses Muon for the matrices; AdamW is enough at this size).

    python scripts/build_demo_model.py            # about 10 minutes on 2 cores
    python scripts/build_demo_model.py --steps 20 --max-docs 300 --out /tmp/demo   # smoke test

`--stage chat` adds a chat stage to an existing build: chatsft_checkpoints/d4/, fine-tuned from the latest base
checkpoint on conversations built offline from the standard library (a question about a function, answered
with its docstring's first paragraph: saelightning.demo.demo_conversations) in nanochat's chat format, the loss
on the assistant's tokens only (nanochat's SFT mask). Every tenth conversation is held out for the val loss.

    python scripts/build_demo_model.py --stage chat --steps 150 --lr 1e-3 --warmup 10
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from saelightning.demo import DEMO_MODEL_DIR, demo_conversations, ensure_demo_shards
from saelightning.nanochat.checkpoint import load_nanochat, save_nanochat_checkpoint
from saelightning.nanochat.model import GPT, GPTConfig
from saelightning.nanochat.shards import TextStream, list_shards
from saelightning.nanochat.tokenizer import save_tokenizer, train_tokenizer

MAX_BYTES = 20 * 2**20  # the bundled model must stay small enough to live in git


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEMO_MODEL_DIR, help="output dir (nanochat base dir layout)")
    p.add_argument("--cache-dir", type=Path, default=None, help="demo shard cache (default: ensure_demo_shards's)")
    p.add_argument("--max-docs", type=int, default=None, help="use only the first N corpus documents (smoke tests)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=500, help="optimizer steps (fixed, so the build is reproducible)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW lr of the matrices; embeddings get 3x")
    p.add_argument("--warmup", type=int, default=30, help="linear warm-up steps; then linear decay to 10%")
    p.add_argument("--val-tokens", type=int, default=131072,
                   help="val tokens scored for val bpb (the whole shard if fewer)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage", choices=["base", "chat"], default="base",
                   help="base: tokenizer + base model (replaces --out); chat: fine-tune the base into "
                        "chatsft_checkpoints")
    return p.parse_args(argv)


def read_split(paths) -> list[str]:
    return list(TextStream(paths, loop=False, shuffle=False))


def flatten(tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents as one token stream, each starting with <|bos|> (nanochat's document delimiter)."""
    rows = tokenizer.encode_batch(docs)
    return torch.tensor([t for row in rows for t in row], dtype=torch.int32)


def demo_config(vocab_size: int, seq_len: int) -> GPTConfig:
    return GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=4, n_head=2, n_kv_head=1,
                     n_embd=128, window_pattern="SSSL", era="current")


def make_optimizer(model: GPT, lr: float) -> torch.optim.Optimizer:
    # Embedding tables learn faster with a larger lr; 1-D gains/lambdas get no weight decay.
    embed = [p for n, p in model.named_parameters() if "wte" in n or "value_embeds" in n]
    ids = {id(p) for p in embed}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [
        {"params": embed, "lr": 3 * lr, "weight_decay": 0.0},
        {"params": [p for p in rest if p.dim() >= 2], "lr": lr, "weight_decay": 0.01},
        {"params": [p for p in rest if p.dim() < 2], "lr": lr, "weight_decay": 0.0},
    ]
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 1.0 - 0.9 * (step - warmup) / max(steps - warmup, 1)


def batch(stream: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator):
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=gen)
    rows = torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()]).long()
    return rows[:, :-1], rows[:, 1:]


def loss_fn(model: GPT, x: torch.Tensor, y: torch.Tensor, reduction="mean") -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction=reduction, ignore_index=-1)


@torch.no_grad()
def val_bpb(model: GPT, val: torch.Tensor, token_bytes: torch.Tensor, seq_len: int, max_tokens: int) -> float:
    """nanochat's bits per byte: summed nats / (ln 2 * summed UTF-8 bytes), special-token targets left out."""
    model.eval()
    nats, nbytes = 0.0, 0
    n_windows = max(1, min(max_tokens, len(val) - 1) // seq_len)
    for w in range(0, n_windows, 8):
        starts = range(w * seq_len, min(w + 8, n_windows) * seq_len, seq_len)
        rows = torch.stack([val[s : s + seq_len + 1] for s in starts]).long()
        losses = loss_fn(model, rows[:, :-1], rows[:, 1:], reduction="none")
        weights = token_bytes[rows[:, 1:].reshape(-1)]
        nats += losses[weights > 0].sum().item()
        nbytes += weights.sum().item()
    model.train()
    return nats / (math.log(2) * nbytes)


def train(model, stream, args, make_batch=None, every: int = 50) -> tuple[float, int]:
    """AdamW steps on batches drawn from `stream` by `make_batch` (default: plain next-token batches); the
    final loss EMA and the tokens trained on."""
    make_batch = make_batch or batch
    opt = make_optimizer(model, args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    ema, t0 = None, time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, args.steps, args.warmup)
        x, y = make_batch(stream, args.batch_size, args.seq_len, gen)
        loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % every == 0 or step == args.steps - 1:
            print(f"step {step:5d}/{args.steps} loss {loss.item():.4f} (ema {ema:.4f}) {time.time() - t0:6.0f}s",
                  flush=True)
    return ema, args.steps * args.batch_size * args.seq_len


def greedy(model, tokenizer, prompt: str, n: int = 48) -> str:
    ids = tokenizer.encode(prompt)
    out = [step[0] for step in model.generate(ids, max_tokens=n, temperature=0.0)]
    return prompt + tokenizer.decode(out)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def chat_stream(tokenizer, conversations) -> torch.Tensor:
    """Rendered conversations back to back as one stream [2, n]: token ids, and the SFT target mask."""
    ids, mask = [], []
    for conversation in conversations:
        i, m = tokenizer.render_conversation(conversation)
        ids += i
        mask += m
    return torch.tensor([ids, mask], dtype=torch.int32)


def chat_batch(stream: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator):
    """Random windows; targets outside the assistant's turns are -1 (ignored by the loss)."""
    starts = torch.randint(0, stream.shape[1] - seq_len - 1, (batch_size,), generator=gen).tolist()
    rows = torch.stack([stream[:, s : s + seq_len + 1] for s in starts]).long()
    return rows[:, 0, :-1], torch.where(rows[:, 1, 1:] > 0, rows[:, 0, 1:], -1)


@torch.no_grad()
def chat_val_loss(model: GPT, stream: torch.Tensor, seq_len: int) -> float:
    """Mean loss on the assistant tokens of the held-out conversations (consecutive windows)."""
    model.eval()
    total, count = 0.0, 0
    for s in range(0, stream.shape[1] - seq_len - 1, seq_len * 8):
        starts = range(s, min(s + seq_len * 8, stream.shape[1] - seq_len - 1), seq_len)
        rows = torch.stack([stream[:, t : t + seq_len + 1] for t in starts]).long()
        y = torch.where(rows[:, 1, 1:] > 0, rows[:, 0, 1:], -1)
        total += loss_fn(model, rows[:, 0, :-1], y, reduction="sum").item()
        count += int((y >= 0).sum())
    model.train()
    return total / count


def build_chat(args) -> int:
    """The chat stage: fine-tune the latest base checkpoint of args.out on the stdlib docstring conversations."""
    t_start = time.time()
    model, tokenizer, meta = load_nanochat(args.out, dtype=torch.float32)
    model.train().requires_grad_(True)
    conversations = demo_conversations()
    train_c = [c for i, c in enumerate(conversations) if i % 10]
    val_c = conversations[::10]
    train_s, val_s = chat_stream(tokenizer, train_c), chat_stream(tokenizer, val_c)
    print(f"{len(train_c)} train / {len(val_c)} val conversations, {train_s.shape[1]} / {val_s.shape[1]} tokens "
          f"({int(train_s[1].sum())} / {int(val_s[1].sum())} assistant tokens)", flush=True)
    before = chat_val_loss(model, val_s, args.seq_len)
    t0 = time.time()
    ema, _ = train(model, train_s, args, chat_batch, every=25)
    train_time = time.time() - t0
    after = chat_val_loss(model, val_s, args.seq_len)
    tag = Path(meta["path"]).parent.name if Path(meta["path"]).is_file() else Path(meta["path"]).name
    extra = {"source": {"stage": "base", "tag": tag, "step": meta["step"]}, "train_loss": ema,
             "val_loss_assistant_before": before, "val_loss_assistant": after, "training_seconds": round(train_time, 1),
             "training_tokens": args.steps * args.batch_size * args.seq_len, "conversations": len(train_c),
             "user_config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                             if k not in ("out", "cache_dir")}}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = {**dataclasses.asdict(model.config)}
    out = save_nanochat_checkpoint(args.out / "chatsft_checkpoints" / tag, args.steps, state, config, extra_meta=extra)
    print(f"val loss on the assistant's tokens: {before:.4f} (base) -> {after:.4f} (chat); "
          f"{train_time:.0f}s training, {time.time() - t_start:.0f}s total; wrote {out}")
    prompt = tokenizer.render_conversation([{"role": "user", "content": "What does os.path.join(a, *p) do?"}])[0]
    prompt.append(tokenizer.encode_special("<|assistant_start|>"))
    reply = [step[0] for step in model.eval().generate(prompt, max_tokens=40, temperature=0.0)]
    print("greedy reply:", repr(tokenizer.decode(reply)))
    if dir_size(args.out) > 2 * MAX_BYTES:
        raise SystemExit(f"{args.out} is over {2 * MAX_BYTES} bytes")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.stage == "chat":
        return build_chat(args)
    torch.manual_seed(args.seed)
    t_start = time.time()

    shards = ensure_demo_shards(args.cache_dir, max_docs=args.max_docs)
    train_paths, val_path = list_shards(shards)
    train_docs, val_docs = read_split(train_paths), read_split([val_path])
    tokenizer = train_tokenizer(train_docs, args.vocab_size)  # nanochat trains it on the train split only
    train_tokens, val_tokens = flatten(tokenizer, train_docs), flatten(tokenizer, val_docs)
    docs = train_docs + val_docs
    print(f"corpus: {len(docs)} docs, {sum(map(len, docs))} chars, {len(train_tokens) + len(val_tokens)} tokens "
          f"(train {len(train_tokens)}, val {len(val_tokens)}); tokenizer vocab {tokenizer.vocab_size}", flush=True)

    config = demo_config(tokenizer.vocab_size, args.seq_len)
    model = GPT(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters, {dataclasses.asdict(config)}", flush=True)
    t_train = time.time()
    train_loss, n_train_tokens = train(model, train_tokens, args)
    train_time = time.time() - t_train
    bpb = val_bpb(model, val_tokens, tokenizer.token_bytes(), args.seq_len, args.val_tokens)

    write_model(args, model, tokenizer, config, train_loss, bpb, n_train_tokens, train_time)
    size = dir_size(args.out)
    print(f"training tokens {n_train_tokens}, training wall time {train_time:.0f}s "
          f"(total {time.time() - t_start:.0f}s)")
    print(f"final train loss {train_loss:.4f} (ln vocab = {math.log(tokenizer.vocab_size):.3f}), val bpb {bpb:.4f}")
    print(f"wrote {args.out}: {size / 2**20:.2f} MiB")
    print("greedy from 'def ':", repr(greedy(model.eval(), tokenizer, "def ")))
    if size > MAX_BYTES:
        raise SystemExit(f"{args.out} is {size} bytes, over the {MAX_BYTES} byte budget")
    return 0


def write_model(args, model, tokenizer, config, train_loss, bpb, n_train_tokens, train_time) -> None:
    """Write the whole output dir beside the old one, then swap it in (never half-written)."""
    out = args.out.resolve()
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_tokenizer(tokenizer, tmp / "tokenizer")
    user_config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("out", "cache_dir")}
    meta = {
        "val_bpb": bpb,
        "user_config": {**user_config, "depth": config.n_layer, "optimizer": "AdamW", "device_type": "cpu",
                        "dtype": "float32"},
        "device_batch_size": args.batch_size,
        "max_seq_len": args.seq_len,
        "train_loss": train_loss,
        "training_tokens": n_train_tokens,
        "training_seconds": round(train_time, 1),
    }
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_nanochat_checkpoint(tmp / "base_checkpoints" / f"d{config.n_layer}", args.steps, state,
                             dataclasses.asdict(config), extra_meta=meta)
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
