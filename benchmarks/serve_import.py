"""Import time of ``medsight.serve`` in a fresh interpreter, for two source trees alternated A B A B ...

    git archive <old commit> | tar -x -C /tmp/before
    python benchmarks/serve_import.py --before /tmp/before --repeats 7

``--after`` defaults to this checkout. Each run is ``python -c "import medsight.serve"`` with PYTHONPATH set to
the tree, timed from outside (process start to exit, so the interpreter's own start-up is included in both),
plus the list of medsight and plotting modules it loaded. Results: benchmarks/results/serve_import.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _results import positive_int, save_result

CODE = ("import sys, medsight.serve; print(' '.join(sorted(m for m in sys.modules "
        "if m.startswith(('medsight.reporting', 'medsight.engine', 'medsight.evaluation', 'medsight.optim', "
        "'matplotlib.pyplot')))))")


def one_run(tree: Path) -> tuple[float, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    # run inside the tree: ``python -c`` puts the working directory first on sys.path, before PYTHONPATH
    done = subprocess.run([sys.executable, "-c", CODE], env=env, cwd=tree, capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, done.stdout.split()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, type=Path, help="source tree of the earlier version")
    p.add_argument("--after", type=Path, default=Path(__file__).resolve().parent.parent)
    p.add_argument("--repeats", type=positive_int, default=7)
    args = p.parse_args()
    one_run(args.before), one_run(args.after)  # warm the file cache for both
    times: dict[str, list[float]] = {"before": [], "after": []}
    loaded: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for name, tree in (("before", args.before), ("after", args.after)):
            seconds, mods = one_run(tree)
            times[name].append(round(seconds, 3))
            loaded[name] = mods
    result = {
        "command": f"python benchmarks/serve_import.py --before BEFORE_TREE --repeats {args.repeats}",
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU", "python": platform.python_version(),
        **{name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "runs_s": v,
                  "loaded": loaded[name]} for name, v in times.items()},
    }
    save_result("serve_import.json", result)


if __name__ == "__main__":
    main()
