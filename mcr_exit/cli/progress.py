"""Progress bars on stderr for the long commands (a callable that takes how much was done)."""

from __future__ import annotations

from collections.abc import Callable


def progress_bar(total: int, *, desc: str, unit: str) -> Callable[[int], None]:
    """A tqdm bar on stderr; the returned function advances it by n and closes it when full."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True)

    def update(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return update
