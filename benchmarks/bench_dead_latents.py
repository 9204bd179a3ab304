"""Dead latents and reconstruction at a target L0, every architecture, on the bundled model.

    .venv/bin/python benchmarks/bench_dead_latents.py [--targets 32 128]
        [--architectures standard gated jumprelu ...] [--tokens 1228800] [--batch-size 1024]
        [--out /tmp/bench_dead] [--tag after] [--plot benchmarks/frontier.png]
        [-- EXTRA TRAIN FLAGS]

What it does:

1. Caches the activations once with `saekit cache` (the bundled model on its corpus's training
   split, `blocks.2.hook_resid_pre`, and `blocks.2.hook_mlp_out` for the transcoders), so every
   run reads the same tokens in the same order without running the model again. With
   --from-model every run reads the model instead, as a plain `saekit train` does (windows
   of text drawn from its pool of `shuffle_tokens`).
2. Trains each architecture at each target with `saekit train --target-l0 T` (16x, the token
   budget in batches of --batch-size, every other setting at its default; flags after `--` are
   passed to every run, e.g. `-- --no-resample-dead-latents --no-start-at-target`).
3. Reads each run's `metrics.json`: held-out L0, explained variance, CE loss score and the
   dead fraction, all measured by the run's own final evaluation on the corpus's test split.
4. Prints one markdown table, appends the rows (with --tag) to `results.jsonl` in --out and,
   with --plot, draws explained variance and CE loss score against L0 per architecture from
   every row of that tag in `results.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HOOK = "blocks.2.hook_resid_pre"
HOOK_OUT = "blocks.2.hook_mlp_out"
ARCHITECTURES = ["standard", "gated", "jumprelu", "batchtopk", "matryoshka_batchtopk"]
SAEKIT = [sys.executable, "-m", "saekit.cli"]


def cache(out: Path, tokens: int, transcoders: bool) -> Path:
    """The activation cache for the runs (written once; rerunning resumes or reuses it)."""
    folder = out / ("cache_pair" if transcoders else "cache")
    hooks = [HOOK, HOOK_OUT] if transcoders else [HOOK]
    flags = [flag for hook in hooks for flag in ("--hook-name", hook)]
    subprocess.run(
        [*SAEKIT, "cache", "--model", "bundled", "--dataset", "bundled", *flags,
         "--tokens", str(tokens), "--out", str(folder), "--no-progress", "-q"],
        check=True,
    )
    return folder


def train(
    out: Path, activations: Path | None, architecture: str, target: int, tokens: int,
    batch_size: int, extra: list[str],
) -> dict[str, Any]:
    run = out / "runs" / f"{architecture}-{target}"
    transcoder = "transcoder" in architecture
    hooks = ["--hook-name", HOOK] + (["--hook-name-out", HOOK_OUT] if transcoder else [])
    started = time.perf_counter()
    subprocess.run(
        [*SAEKIT, "train", "--architecture", architecture,
         *([] if activations is None else ["--activations", str(activations)]), *hooks,
         "--tokens", str(tokens), "--batch-size", str(batch_size),
         "--target-l0", str(target), "--out", str(run), "--overwrite", "--no-report",
         "--no-progress", "-q", *extra],
        check=True,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    return {
        "architecture": architecture,
        "target_l0": target,
        "l0": metrics["l0"],
        "explained_variance": metrics["explained_variance"],
        "ce_loss_score": metrics.get("ce_loss_score"),
        "dead_fraction": metrics["dead_fraction"],
        "seconds": round(time.perf_counter() - started),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| architecture | target | held-out L0 | explained variance | CE loss score | dead |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ce = "" if r["ce_loss_score"] is None else f"{r['ce_loss_score']:.3f}"
        lines.append(
            f"| {r['architecture']} | {r['target_l0']} | {r['l0']:.1f} | "
            f"{r['explained_variance']:.3f} | {ce} | {r['dead_fraction']:.1%} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for architecture in dict.fromkeys(r["architecture"] for r in rows):
        mine = sorted((r for r in rows if r["architecture"] == architecture),
                      key=lambda r: r["l0"])
        l0 = [r["l0"] for r in mine]
        axes[0].plot(l0, [r["explained_variance"] for r in mine], "o-", label=architecture)
        axes[1].plot(l0, [r["ce_loss_score"] for r in mine], "o-", label=architecture)
    for ax, name in zip(axes, ("explained variance", "CE loss score"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("held-out L0")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("bundled model, blocks.2.hook_resid_pre, 16x, 1.2M tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--architectures", nargs="+", default=ARCHITECTURES)
    parser.add_argument("--tokens", type=int, default=1_228_800)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_dead"))
    parser.add_argument("--tag", default="after", help="names these rows in results.jsonl")
    parser.add_argument("--plot", type=Path, help="draw the frontier of this tag's rows")
    parser.add_argument("--from-model", action="store_true",
                        help="train from the model's activations (no cache), as a plain run")
    args, extra = parser.parse_known_args()
    extra = [flag for flag in extra if flag != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for architecture in args.architectures:
        transcoder = "transcoder" in architecture
        activations = None if args.from_model else cache(args.out, args.tokens, transcoder)
        for target in args.targets:
            row = train(args.out, activations, architecture, target, args.tokens,
                        args.batch_size, extra)
            row["tag"] = args.tag
            row["flags"] = extra
            rows.append(row)
            with (args.out / "results.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(table(rows))
    if args.plot:
        lines = (args.out / "results.jsonl").read_text().splitlines()
        tagged = [r for r in map(json.loads, lines) if r["tag"] == args.tag]
        plot(tagged, args.plot)
        print(f"frontier plot: {args.plot}")


if __name__ == "__main__":
    main()
