"""How long-running core work reports progress and learns that the user asked it to stop."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


class JobCancelled(Exception):
    """Raised inside long work (between batches) when the user asked to stop it."""


def _ignore_progress(fraction: float, message: str) -> None:
    pass


def _never_cancelled() -> bool:
    return False


def _ignore_metrics(values: dict) -> None:
    pass


@dataclass
class Reporter:
    """One object threaded through extraction, sweeps and training.

    The CLI wires it to tqdm, the worker to the jobs table; core code only calls
    `progress`, `metrics` and `check_cancel`, so it never knows who is listening.
    """

    on_progress: Callable[[float, str], None] = field(default=_ignore_progress)
    is_cancelled: Callable[[], bool] = field(default=_never_cancelled)
    on_metrics: Callable[[dict], None] = field(default=_ignore_metrics)

    def progress(self, fraction: float, message: str = "") -> None:
        self.on_progress(min(max(float(fraction), 0.0), 1.0), message)

    def metrics(self, **values) -> None:
        """A row of a live curve (e.g. epoch, loss, eval map@k) for the dashboard."""
        self.on_metrics(values)

    def check_cancel(self) -> None:
        if self.is_cancelled():
            raise JobCancelled("stopped at the user's request")


SILENT = Reporter()
