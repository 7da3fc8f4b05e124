"""Atomic writes: a file or a directory appears whole, or the old one stays as it was.

Every output of the package goes through here: Lightning checkpoints, SAE exports, cache shards and
manifests, reports, dashboards, nanochat checkpoints and tokenizers, demo shards. A file is written
to a temporary sibling, flushed to disk (fsync), then renamed over its target; a directory is filled
as a temporary sibling, then swapped in. A failed write (a full disk, a file-size limit, Ctrl-C)
removes the temporary and leaves the previous version intact, and a full disk is one line naming the
path and the free space. New files get the permissions the umask gives (as `open` would), so
colleagues on a shared cluster can read what a run wrote.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from saelightning.errors import SAELightningError

OUTPUT_MANIFEST = "saelightning-output.json"  # marks a directory a command wrote, and which command
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _umask_mode(base: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def disk_full_error(path: Path, reason: str) -> SAELightningError:
    """The one line for a write that ran out of room (ENOSPC, a file-size limit, a quota)."""
    free = _free_bytes(Path(path).parent)
    room = f"{free / 2**30:.2f} GiB free there" if free is not None else "free space unknown"
    return SAELightningError(f"cannot write {path}: {reason} ({room}); the previous version of it, if any, is "
                             "intact: free space (or raise the limit) and run the command again")


def _raise_if_full(path: Path, err: BaseException) -> None:
    if isinstance(err, OSError) and err.errno in _FULL:
        raise disk_full_error(path, os.strerror(err.errno)) from None


@contextmanager
def atomic_path(path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that wants a file name (safetensors, parquet);
    on success the file is fsynced and renamed over `path`.

    mode: the file's permissions; default 0o666 less the umask, as a plain open() gives.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode(0o666) if mode is None else mode)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        _raise_if_full(path, err)
        raise


@contextmanager
def atomic_file(path, mode: int | None = None) -> Iterator:
    """Yield a binary file object; on success it becomes `path` (fsynced, renamed over it)."""
    with atomic_path(path, mode) as tmp, open(tmp, "wb") as f:
        yield f


def write_bytes(path, data: bytes, mode: int | None = None) -> None:
    with atomic_file(path, mode) as f:
        f.write(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj, indent: int | None = 1) -> None:
    """JSON (NaN allowed, as Python writes it) written atomically."""
    write_text(path, json.dumps(obj, indent=indent, allow_nan=True) + "\n")


def _check_replaceable(out: Path, kind: str | None) -> None:
    """An existing `out` may be replaced only when it is a directory an earlier run of `kind` wrote (or empty)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SAELightningError(f"{out} exists and is not a directory; pass a directory path")
    if kind is None or not any(out.iterdir()):
        return
    try:
        written_by = json.loads((out / OUTPUT_MANIFEST).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        written_by = None
    if written_by != kind:
        raise SAELightningError(f"--out {out} exists and is not an earlier `saelightning {kind}` output; "
                                "pass a new or empty directory")


def swap_in(new: Path, target: Path) -> None:
    """Rename the directory `new` to `target`; an existing target is moved aside first and removed after,
    and put back if the rename fails."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / "dir")
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / "dir", target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out, kind: str | None = None, manifest: dict | None = None) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces `out` whole.

    kind: a command's outputs carry OUTPUT_MANIFEST naming the command, and only such a directory (or an
    empty one) is replaced; None replaces any directory (an SAE export, whose files say what it is).
    """
    out = Path(out).expanduser().absolute()
    _check_replaceable(out, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if kind is not None:
            (tmp / OUTPUT_MANIFEST).write_text(json.dumps({"kind": kind, **(manifest or {})}, indent=1))
        os.chmod(tmp, _umask_mode(0o777))  # mkdtemp makes it private; an output is meant to be read
        swap_in(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_full(out, err)
        raise


def sha256_file(path) -> str:
    """The hex sha256 of a file, read in 4 MiB blocks (shard identities in caches and activation manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
