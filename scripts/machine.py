"""One line naming the machine a figure or a result came from: CPU model, cores, the instruction
set torch's CPU kernels use, torch's thread count and version, and the load average now. Results
of the same seed move between machines (README, "Same seed, same result"), so every committed
result and every timing says where it came from.

    .venv/bin/python scripts/machine.py            # the line
    .venv/bin/python scripts/machine.py --results  # outputs/MACHINE.md for the committed results
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasn import lineage


def load() -> str:
    return "load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())


def machine() -> str:
    return (f"{lineage.cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()} kernels, {torch.get_num_threads()} threads)")


def results_note() -> str:
    """outputs/MACHINE.md: where the committed results (dvc.lock, outputs/) were made."""
    return "\n".join([
        "# Where the committed results come from",
        "",
        f"`make demo-results` (`make run`, then `dvc push` into dvc-storage/) on {time.strftime('%Y-%m-%d')}:",
        f"{machine()}; {load()} at the end.",
        "",
        "The same seed gives the same result on the same machine and thread count, to the bit, but",
        "not across machines: `dvc metrics diff` against these results on another CPU shows a",
        "difference that is not yours (README, \"Same seed, same result\": how far, and why).",
        "",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", action="store_true", help="print outputs/MACHINE.md instead of the line")
    args = ap.parse_args()
    print(results_note() if args.results else f"{machine()}; {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
