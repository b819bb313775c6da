"""Where benchmark results go: benchmarks/results/NAME.json, written whole and echoed to stdout."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def save_result(name: str, data: Any, echo: bool = True) -> Path:
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / name
    out.write_text(json.dumps(data, indent=2) + "\n")
    if echo:
        print(json.dumps(data, indent=2))
    return out


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count of rounds or repeats: a median needs one)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def mean_sd(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value), rounded for the results files."""
    return {"mean": round(statistics.fmean(values), 4),
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}
