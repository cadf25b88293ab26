"""One rich console on stderr, rank-zero printing and progress bars.

stdout is reserved for `--json` summaries, so everything a person reads goes to stderr.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, highlight=False, soft_wrap=True)


def rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def is_rank_zero() -> bool:
    return rank() == 0


def log(message: str, *, all_ranks: bool = False) -> None:
    """Print a line to stderr, on rank zero only unless `all_ranks`."""
    if all_ranks or is_rank_zero():
        console.print(_prefix() + message)


def warn(message: str) -> None:
    if is_rank_zero():
        console.print(f"{_prefix()}[yellow]warning:[/yellow] {message}")


def _prefix() -> str:
    """`[replica k/N] ` in the worker processes of data-parallel inference (mathctl/replicas.py)."""
    from rich.markup import escape

    return escape(os.environ.get("MATHCTL_LOG_PREFIX", ""))


@contextmanager
def progress(description: str, total: int | None, *, enabled: bool = True):
    """A rich progress bar on rank zero; a no-op elsewhere or when stderr is not wanted.

    Yields a function `advance(n=1, **fields)`.
    """
    show = enabled and is_rank_zero() and os.environ.get("MATHCTL_NO_PROGRESS") != "1"
    if not show:
        yield lambda n=1, **fields: None
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not sys.stderr.isatty() and os.environ.get("MATHCTL_FORCE_PROGRESS") != "1",
    )
    with bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields) -> None:
            info = " ".join(f"{k}={v}" for k, v in fields.items())
            bar.update(task, advance=n, info=info)

        yield advance


def print_table(table) -> None:
    """A rich table on stderr; piped or captured output gets a wide line instead of squeezed columns."""
    if console.is_terminal:
        console.print(table)
    else:
        Console(stderr=True, highlight=False, width=max(console.width, 160)).print(table)
