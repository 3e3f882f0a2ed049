"""How the round loop reports progress: a rich progress bar (the simulator's terminal) or plain
log lines (the Flower ServerApp, whose stdout ``memfl flower local`` filters and forwards).

The loop calls, in order: ``with reporter:`` -> :meth:`start` -> per round :meth:`client` (by the
executor, where it runs clients one by one), :meth:`warn` for a failed client, :meth:`round_done`
-> :meth:`finished`. :meth:`note` at any time.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Reporter(Protocol):
    def __enter__(self) -> "Reporter": ...
    def __exit__(self, *exc: Any) -> None: ...
    def start(self, total: int, done: int) -> None: ...
    def note(self, text: str) -> None: ...
    def warn(self, text: str) -> None: ...
    def client(self, rnd: int, i: int, n: int) -> None: ...
    def round_done(self, entry: dict[str, Any], total: int) -> None: ...
    def finished(self, results_path: str) -> None: ...


class ConsoleReporter:
    """A rich progress bar of rounds (``progress=False``: none) and coloured notes on ``console``."""

    def __init__(self, console: Console, progress: bool = True) -> None:
        self.console = console
        self.total = 0
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=not progress,
            transient=False,
        )
        self.task: Any = None

    def __enter__(self) -> "ConsoleReporter":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def start(self, total: int, done: int) -> None:
        self.total = total
        self.task = self.bar.add_task("rounds", total=total, completed=done)

    def note(self, text: str) -> None:
        self.console.print(f"[yellow]{text}[/yellow]")

    def warn(self, text: str) -> None:
        self.console.print(f"[red]{text}[/red]")

    def client(self, rnd: int, i: int, n: int) -> None:
        self.bar.update(self.task, description=f"round {rnd}/{self.total} client {i + 1}/{n}")

    def round_done(self, entry: dict[str, Any], total: int) -> None:
        acc = f"acc {entry['accuracy']:.4f}" if entry["accuracy"] is not None else ""
        self.bar.update(self.task, advance=1, description=f"round {entry['round']}/{total} {acc}")

    def finished(self, results_path: str) -> None:
        pass  # `memfl run` prints where the results are


class LogReporter:
    """One line per event through ``log`` (the lines ``memfl flower local`` forwards start with
    ``round ``, ``resuming``, ``results in``, ``node ``, ``only ``)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log

    def __enter__(self) -> "LogReporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def start(self, total: int, done: int) -> None:
        pass

    def note(self, text: str) -> None:
        self.log(text)

    def warn(self, text: str) -> None:
        self.log(text)

    def client(self, rnd: int, i: int, n: int) -> None:
        pass

    def round_done(self, entry: dict[str, Any], total: int) -> None:
        acc = f"accuracy {entry['accuracy']:.4f}" if entry["accuracy"] is not None else "not evaluated"
        ok = sum(1 for c in entry["clients"] if c["status"] == "ok")
        self.log(
            f"round {entry['round']}/{total}: {acc}, {ok}/{len(entry['clients'])} clients ok, "
            f"{entry['round_seconds']:.1f} s"
        )

    def finished(self, results_path: str) -> None:
        self.log(f"results in {results_path}")
