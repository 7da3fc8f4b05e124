"""Lightning checkpoints on disk: written atomically, checked before a resume, and exported by `saelightning export`.

A checkpoint is torch.save's zip archive. AtomicCheckpointIO writes it to a temporary file, fsyncs and
renames it, so a full disk or a kill mid-write leaves the previous last.ckpt intact. `check_checkpoint`
reads the archive's CRCs before a resume, so a truncated or corrupt file is one line that names the
newest intact step checkpoint beside it instead of a traceback from deep inside torch.load.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from saelightning.atomic import atomic_file, disk_full_error
from saelightning.callbacks import export_module
from saelightning.command import parse
from saelightning.errors import SAELightningError
from saelightning.module import SAEModule
from saelightning.parallel import gather_shards

_STEP = re.compile(r"step=(\d+)")


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are atomic (temporary file, fsync, rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            with atomic_file(path) as f:
                torch.save(checkpoint, f)
        except RuntimeError as e:  # torch's zip writer reports a short write (full disk, size limit) this way
            if "inline_container" not in str(e) and "write" not in str(e).lower():
                raise
            raise disk_full_error(Path(path), "the write stopped short") from None


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be a checkpoint (missing, truncated, corrupt), or None when it is an intact archive."""
    if not path.is_file():
        return "it does not exist"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every member and checks its CRC
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"it is truncated or corrupt ({e})"
    return None if bad is None else f"its member {bad} is corrupt"


def step_of(path: Path) -> int:
    match = _STEP.search(path.name)
    return int(match.group(1)) if match else -1


def intact_neighbour(path: Path) -> Path | None:
    """The newest intact step checkpoint in path's folder (other than path itself)."""
    candidates = sorted((p for p in path.parent.glob("*.ckpt") if p != path and step_of(p) >= 0), key=step_of,
                        reverse=True)
    return next((p for p in candidates if checkpoint_problem(p) is None), None)


def check_checkpoint(path: Path, flag: str = "--ckpt_path") -> None:
    """Refuse a checkpoint that is not an intact archive, naming the intact step checkpoint beside it."""
    problem = checkpoint_problem(path)
    if problem is None:
        return
    other = intact_neighbour(path)
    fix = f"resume from the intact {other.name} beside it: {flag} {other}" if other is not None else \
        f"no intact step checkpoint is beside it; pass another {flag} or start afresh"
    raise SAELightningError(f"cannot use the checkpoint {path}: {problem}; {fix}")


def read_checkpoint(path: Path) -> dict:
    check_checkpoint(path, "--ckpt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SAELightningError(f"{path} is not a readable saelightning checkpoint ({type(e).__name__}: {reason}); "
                                "pass a .ckpt written by `saelightning fit`") from None


def export_checkpoint(ckpt_path, out_root) -> list[Path]:
    """Export every SAE of a Lightning checkpoint written by `saelightning fit` (a .ckpt or its run dir)."""
    path = Path(ckpt_path)
    if path.is_dir():
        path = path / "last.ckpt"
    if not path.is_file():
        raise SAELightningError(f"no checkpoint at {path}; pass a .ckpt file or a run dir holding last.ckpt")
    checkpoint = read_checkpoint(path)
    try:
        hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
        state = checkpoint["state_dict"]
    except (KeyError, TypeError, AttributeError):
        raise SAELightningError(f"{path} holds no SAEModule state; "
                                "pass a .ckpt written by `saelightning fit`") from None
    if checkpoint.get("latent_shards"):  # a latent-parallel run: its shard files beside it, gathered whole
        state = gather_shards(path, state, checkpoint["latent_shards"])
    module = SAEModule(**hparams)
    module.load_state_dict(state)
    return export_module(module, Path(out_root), checkpoint.get("global_step", 0),
                         checkpoint.get("saelightning_metrics", {}), checkpoint.get("saelightning_metrics_step"))


@dataclass
class ExportArgs:
    """Export the SAEs of a Lightning checkpoint written by `saelightning fit` to OUT/<name>/ (SAELens layout).

    Args:
        ckpt: a .ckpt written by `saelightning fit`, or its run dir (then its last.ckpt).
        out: output directory; each SAE goes to OUT/<name>/.
    """

    ckpt: str
    out: str


def cli_main(argv: Sequence[str]) -> int:
    args = parse(ExportArgs, argv, "saelightning export")
    if args is None:
        return 0
    for path in export_checkpoint(args.ckpt, args.out):
        print(f"exported {path}")
    return 0

