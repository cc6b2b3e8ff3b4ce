"""Training progress: a bar on a terminal, a few lines per epoch anywhere else, nothing off rank 0."""

from __future__ import annotations

import io
import logging

from tasn.training.progress import LINES, EpochProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(stream: io.StringIO, total: int, initial: int = 0, enabled: bool = True) -> None:
    bar = EpochProgress(total, initial, "epoch 2/8", enabled=enabled, stream=stream)
    for k in range(initial, total):
        bar.show(loss=f"{2.0 - k / 100:.3f}", lr="0.1")
        bar.update()
    bar.close()


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tasn.training.progress"]


def test_off_a_terminal_an_epoch_of_many_steps_logs_a_line_at_each_quarter_and_draws_no_bar(caplog):
    caplog.set_level(logging.INFO)
    stream = io.StringIO()
    _run(stream, total=75)
    assert stream.getvalue() == ""  # no bar frames in a log file
    assert _lines(caplog) == [
        "epoch 2/8: 19/75 batches (25%), loss 1.820, lr 0.1",
        "epoch 2/8: 38/75 batches (51%), loss 1.630, lr 0.1",
        "epoch 2/8: 57/75 batches (76%), loss 1.440, lr 0.1",
        "epoch 2/8: 75/75 batches (100%), loss 1.260, lr 0.1",
    ]


def test_a_resumed_epoch_reports_only_the_quarters_still_ahead_and_a_short_one_at_most_once_a_batch(caplog):
    caplog.set_level(logging.INFO)
    _run(io.StringIO(), total=75, initial=40)
    assert [line.split(":")[1].split()[0] for line in _lines(caplog)] == ["57/75", "75/75"]
    caplog.clear()
    _run(io.StringIO(), total=2)
    assert len(_lines(caplog)) == 2 <= LINES


def test_on_a_terminal_a_bar_and_no_lines_and_nothing_at_all_when_disabled(caplog):
    caplog.set_level(logging.INFO)
    terminal = Terminal()
    _run(terminal, total=20)
    assert "epoch 2/8" in terminal.getvalue() and "loss=" in terminal.getvalue()  # tqdm drew its bar
    assert _lines(caplog) == []
    quiet, quiet_terminal = io.StringIO(), Terminal()
    _run(quiet, total=20, enabled=False)
    _run(quiet_terminal, total=20, enabled=False)
    assert quiet.getvalue() == quiet_terminal.getvalue() == "" and _lines(caplog) == []
