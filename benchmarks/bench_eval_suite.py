"""The whole evaluation suite on the demo SAE: wall time, data included, and every figure.

    .venv/bin/python benchmarks/bench_eval_suite.py [--sae FOLDER] [--out DIR] [--threads 2]

Without --sae it first trains the demo SAE (`saekit train --out DIR/demo`, not timed). Then it
times one `saekit eval SAE --suite all` (core, sparse_probing, scr, tpp, absorption: model
activations, probes and plots included) in a fresh process, and prints each evaluation's
headline figures and the sparse-probing accuracies per task and k next to the
raw-activation probe.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SAEKIT = [sys.executable, "-m", "saekit.cli"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", type=Path, help="a saved SAE folder (default: train the demo)")
    parser.add_argument("--out", type=Path, default=Path("bench_eval_suite"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    sae = args.sae
    if sae is None:
        sae = args.out / "demo"
        if not (sae / "cfg.json").is_file():
            subprocess.run([*SAEKIT, "train", "--out", str(sae)], check=True, env=env)
    results = args.out / "suite"
    started = time.perf_counter()
    subprocess.run(
        [*SAEKIT, "eval", str(sae), "--suite", "all", "--out", str(results)],
        check=True, env=env,
    )
    seconds = time.perf_counter() - started
    print(f"\nwhole suite on {sae}: {seconds:.0f} s with {args.threads} thread(s)")
    for path in sorted(results.glob("*/*_eval_results.json")):
        record = json.loads(path.read_text())
        print(f"\n{record['eval_type_id']}:")
        for category, metrics in record["eval_result_metrics"].items():
            shown = ", ".join(
                f"{name} {value:.3f}" for name, value in metrics.items()
                if isinstance(value, float)
            )
            print(f"  {category}: {shown}")
        if record["eval_type_id"] == "sparse_probing":
            for detail in record["eval_result_details"]:
                print(f"  {json.dumps(detail)}")


if __name__ == "__main__":
    main()
