"""Write an output directory atomically: fill a temporary sibling, then swap it into place.

A re-run replaces an earlier output of the same kind; a directory that holds something else is
never deleted (the manifest file names what wrote it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from saelightning.errors import SAELightningError

MANIFEST = "saelightning-output.json"  # marks a directory this package wrote, and what wrote it


def _check_replaceable(out: Path, kind: str) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise SAELightningError(f"--out {out} is a file; pass a directory path")
    if not any(out.iterdir()):
        return
    try:
        written_by = json.loads((out / MANIFEST).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        written_by = None
    if written_by != kind:
        raise SAELightningError(f"--out {out} exists and is not an earlier `saelightning {kind}` output; "
                                "pass a new or empty directory")


@contextmanager
def atomic_dir(out, kind: str, manifest: dict | None = None):
    """Yield a temporary directory to fill; on success it becomes `out` (replacing an earlier one)."""
    out = Path(out).expanduser().absolute()
    _check_replaceable(out, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        (tmp / MANIFEST).write_text(json.dumps({"kind": kind, **(manifest or {})}, indent=1))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an output is meant to be read and served
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
