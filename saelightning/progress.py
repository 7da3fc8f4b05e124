"""The progress bar of the commands that stream tokens (eval, viz, neuronpedia, cache): tqdm, as Lightning's
fit bar is, on stderr, so that stdout keeps only the command's results. It shows only on a terminal, and
never under --quiet."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(total: int | None, desc: str, unit: str = "tok", quiet: bool = False, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr; disabled under quiet and when stderr is not a terminal (logs, pipes, CI)."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit == "tok", dynamic_ncols=True,
                file=sys.stderr, disable=True if quiet else None, leave=False)
