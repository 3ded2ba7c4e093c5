"""Progress bars for long jobs (conversion, evaluation, sweeps): `rich` (a dependency of flax) on a terminal,
nothing on a pipe or in CI, where the jobs print their own result lines."""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")


def enabled() -> bool:
    """Bars only where a person watches: stderr is a terminal and `CI` is not set."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield `items`, drawing a bar on stderr (count, elapsed, remaining) when `enabled()`."""
    if not enabled():
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, transient=True, console=Console(stderr=True)) as bar:
        yield from bar.track(items, total=total, description=description)
