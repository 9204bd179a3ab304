"""A standard SAE at a target L0: saekit's controller side by side with SAELens's l1 sweep.

    .venv/bin/python benchmarks/bench_l0_vs_saelens.py [--target-l0 32]
        [--saelens-l1 40 45] [--tokens 1228800] [--batch-size 1024] [--work DIR]

saekit trains with `target_l0` (its controller finds the coefficient); SAELens 6.54 trains
once per l1 coefficient, as its users sweep by hand. Both read the same token windows of the
bundled model's training split (`blocks.2.hook_resid_pre`, 16x, batches of 1,024 by default)
and keep their own defaults otherwise (learning rate, b_dec start, dead window). All SAEs are
then evaluated together by saekit on the same held-out tokens: L0, explained variance, CE
loss score and dead fraction, and each SAELens run is marked when its L0 is within 10% of
saekit's (a matched pair). The SAELens environment and the model conversion come from
bench_vs_saelens.py.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench_vs_saelens import (
    DEFAULT_VENV,
    NORM_BATCHES,
    buffer_rows,
    convert_model,
    ensure_saelens_venv,
    evaluate_folders,
    run_child,
    write_token_windows,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-l0", type=float, default=32)
    parser.add_argument("--saelens-l1", type=float, nargs="+", default=[40.0, 45.0])
    parser.add_argument("--tokens", type=int, default=1_228_800)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--hook", default="blocks.2.hook_resid_pre")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=100_000)
    parser.add_argument("--saelens-normalize", default="none",
                        help="SAELens's normalize_activations (default: its own default, none)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--only", choices=["saekit", "saelens"], default=None,
                        help="train one side only (the other's folders in --work are reused)")
    args = parser.parse_args()

    from saekit.models.bundled import BUNDLED_MODEL_DIR

    python = str(ensure_saelens_venv(args.venv))
    model_dir = Path(BUNDLED_MODEL_DIR).resolve()
    work = (args.work or Path(tempfile.mkdtemp(prefix="saekit_l0_vs_saelens_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    needed = args.tokens + (NORM_BATCHES + 4) * args.batch_size + 2 * buffer_rows(args.batch_size)
    tokens_file = work / "train_tokens.safetensors"
    if not tokens_file.exists():
        write_token_windows(model_dir, tokens_file, math.ceil(needed / (args.context - 2)),
                            args.context)
        convert_model(model_dir, work)
    base = {
        "tokens": args.tokens, "batch_size": args.batch_size, "lr": None, "k": None,
        "expansion": args.expansion, "b_dec_init": None, "dead_window": None,
        "hook": args.hook, "context": args.context, "seed": 0, "threads": args.threads,
        "model_dir": str(model_dir), "model_name": "bundled", "tokens_file": str(tokens_file),
        "work": str(work), "out_parent": str(work), "architecture": "standard",
        "saelens_normalize": args.saelens_normalize,
    }
    runs: dict[str, dict[str, Any]] = {
        f"saekit target {args.target_l0:g}": dict(
            base, library="saekit", target_l0=args.target_l0, l1_coefficient=None),
    }
    for l1 in args.saelens_l1:
        runs[f"saelens l1 {l1:g}"] = dict(base, library="saelens", l1_coefficient=l1)
    folders = {}
    for name, spec in runs.items():
        out = work / name.replace(" ", "_")
        folders[name] = str(out)
        if args.only not in (None, spec["library"]):
            continue
        shutil.rmtree(out, ignore_errors=True)
        child = sys.executable if spec["library"] == "saekit" else python
        print(f"training {name} ...", flush=True)
        result = run_child(child, spec["library"], dict(spec, out=str(out)),
                           work / f"{out.name}.log")
        print(f"  {result['seconds']:.0f} s", flush=True)

    print(f"evaluating on {args.eval_tokens} held-out tokens ...", flush=True)
    keyed = {(name, ""): folder for name, folder in folders.items()}
    metrics = evaluate_folders(model_dir, keyed, args.eval_tokens, True)
    rows = {name: metrics[(name, "")] for name in folders}
    ours = rows[next(iter(rows))].l0
    print("\n| run | held-out L0 | explained variance | CE loss score | dead | L0 within 10% |")
    print("|---|---:|---:|---:|---:|---|")
    summary = {}
    for name, m in rows.items():
        matched = abs(m.l0 - ours) <= 0.1 * ours
        print(f"| {name} | {m.l0:.1f} | {m.explained_variance:.3f} | {m.ce_loss_score:.3f} | "
              f"{m.dead_fraction:.1%} | {'yes' if matched else 'no'} |")
        summary[name] = {"l0": m.l0, "explained_variance": m.explained_variance,
                         "ce_loss_score": m.ce_loss_score, "dead_fraction": m.dead_fraction,
                         "matched": matched}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nsummary written to {work / 'summary.json'}")


if __name__ == "__main__":
    main()
