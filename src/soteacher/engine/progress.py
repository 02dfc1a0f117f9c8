"""A progress bar on a terminal, one line per epoch otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Reports a training run: per-step updates on a terminal, a line at each epoch's end."""

    def __init__(self, name: str, total_epochs: int, stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.name = name
        self.total_epochs = total_epochs
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0

    def step(self, epoch: int, step: int, steps: int, loss: float | None = None) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and step < steps:
            return
        self._last = now
        width = 24
        filled = int(width * step / max(steps, 1))
        bar = "#" * filled + "-" * (width - filled)
        extra = f" loss {loss:.4f}" if loss is not None else ""
        self.stream.write(f"\r{self.name} epoch {epoch}/{self.total_epochs} [{bar}] "
                          f"{step}/{steps}{extra}")
        self.stream.flush()

    def epoch_end(self, record: dict) -> None:
        if not self.enabled:
            return
        keys = ("loss", "train_acc", "test_acc", "val_acc", "lr")
        parts = [f"{k} {record[k]:.4g}" for k in keys if k in record]
        line = f"{self.name} epoch {record['epoch']}/{self.total_epochs} " + " ".join(parts) + \
            f" ({record.get('epoch_time', 0):.1f}s)"
        if self.live:
            self.stream.write("\r" + line + " " * 10 + "\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
