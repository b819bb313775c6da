"""Cross-entropy vs focal loss on the embedded default (everything else at the default).

The cross-entropy row is the default run itself (benchmarks/default_run.py); this adds
`medsight train --set train.loss=focal --set train.focal_gamma=2`.

    python benchmarks/losses.py        # writes benchmarks/results/losses.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import save_result  # noqa: E402
from default_run import measure  # noqa: E402


def main() -> int:
    save_result("losses.json", {"rows": [measure(["--set", "train.loss=focal", "--set", "train.focal_gamma=2"])]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
