"""Where an epoch is, for a person watching: a bar on a terminal, a few lines in a log.

On a terminal, a tqdm bar redrawn in place. Anywhere else (`make run`'s log, CI, a pod's log) a
redrawn bar is a frame per refresh, and a log that is mostly frames hides what matters; so off a
terminal the bar is off and a line is logged at each quarter of the epoch instead (`LINES` per
epoch), with the same numbers the bar shows.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any, TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)

LINES = 4  # progress lines per epoch when not on a terminal


class EpochProgress:
    """Progress through `total` micro-batches, `initial` of them already done (a resumed epoch).

    `update()` after each micro-batch; `show(**numbers)` sets what is reported next to the count.
    Shows nothing when `enabled` is false (ranks other than 0).
    """

    def __init__(self, total: int, initial: int, desc: str, enabled: bool = True, stream: TextIO | None = None):
        stream = stream or sys.stderr
        self.terminal = enabled and stream.isatty()
        self.lines = enabled and not self.terminal
        self.total, self.done, self.desc = total, initial, desc
        self.marks = {math.ceil(total * k / LINES) for k in range(1, LINES + 1)}
        self.numbers: dict[str, str] = {}
        self.bar = tqdm(total=total, initial=initial, desc=desc, file=stream, leave=False, dynamic_ncols=True,
                        disable=not self.terminal)

    def show(self, **numbers: Any) -> None:
        self.numbers = {k: str(v) for k, v in numbers.items()}
        self.bar.set_postfix(self.numbers)

    def update(self) -> None:
        self.done += 1
        self.bar.update()
        if self.lines and self.done in self.marks:
            numbers = ", ".join(f"{k} {v}" for k, v in self.numbers.items())
            log.info("%s: %d/%d batches (%d%%)%s", self.desc, self.done, self.total,
                     round(100 * self.done / max(self.total, 1)), f", {numbers}" if numbers else "")

    def close(self) -> None:
        self.bar.close()
