"""Progress of a stage: parts done and rows/s, a live bar on a terminal, a line every 10 s in
logs (where `ray job logs` shows it)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


class Progress:
    """Parts (or rows of a stream) done, and the rate."""

    def __init__(
        self,
        stage: str,
        parts: int,
        rows: int,
        unit: str,
        show: bool = True,
        log: Callable[[str], None] = print,
    ):
        self.stage, self.parts, self.rows, self.unit = stage, parts, rows, unit
        self.show, self.log = show, log
        self.done_parts = self.done_rows = 0
        self.start = self.last_line = time.perf_counter()
        self.bar = None
        if show and sys.stderr.isatty():
            from tqdm import tqdm

            if parts:
                desc = f"{stage} ({rows:,} {unit})" if rows else stage
                self.bar = tqdm(total=parts, desc=desc, unit="part", dynamic_ncols=True)
            else:  # a stream of rows, total unknown
                self.bar = tqdm(desc=stage, unit=f" {unit}", dynamic_ncols=True)

    def rate(self) -> float:
        return self.done_rows / max(time.perf_counter() - self.start, 1e-9)

    def update(self, rows: int, parts: int = 1) -> None:
        """Count finished parts and rows (parts=0: rows of a stream with no parts)."""
        self.done_parts += parts
        self.done_rows += rows
        if self.bar is not None:
            self.bar.update(parts if self.parts else rows)
            self.bar.set_postfix_str(f"{self.rate():,.0f} {self.unit}/s")
            return
        finished = bool(self.parts) and self.done_parts == self.parts
        if self.show and (time.perf_counter() - self.last_line >= 10 or finished):
            self.last_line = time.perf_counter()
            of = f"/{self.rows:,}" if self.rows else ""
            done = f"{self.done_parts}/{self.parts} parts, " if self.parts else ""
            self.log(
                f"[{self.stage}] {done}{self.done_rows:,}{of} "
                f"{self.unit} ({self.rate():,.0f} {self.unit}/s)"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
