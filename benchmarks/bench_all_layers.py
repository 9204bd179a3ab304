"""SAEs on all 4 residual hooks of the bundled model: one run from one model pass per batch
vs four separate runs, on the same tokens, side by side.

    python benchmarks/bench_all_layers.py [--tokens 409600] [--expansion-factor 8]
        [--device cpu|cuda] [--repeats 1]

Both sides go through `saekit.train` with the model loaded once beforehand (so neither pays
for loading it), no held-out evaluation and no report; each side's time is its whole run:
tokenising, the model's forward passes, the norm estimate and the SAE steps. tokens/s counts
SAE-tokens (4 SAEs x tokens). The four SAEs trained together equal the four trained alone
(same seed, same data), which the script checks before it reports.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import saekit
from saekit.models import load_model

HOOKS = [f"blocks.{i}.hook_resid_pre" for i in range(4)]


def config(out: Path, args: argparse.Namespace, **data: Any) -> dict[str, Any]:
    return {
        "sae": {"architecture": "topk", "expansion_factor": args.expansion_factor, "k": 32},
        "data": {"eval_tokens": 0, **data},
        "training": {"tokens": args.tokens, "batch_size": args.batch_size},
        "run": {"out": str(out), "progress": False, "report": False, "device": args.device,
                "checkpoint_every": args.tokens},
    }


def separate(backend: Any, args: argparse.Namespace, folder: Path) -> tuple[float, list[Any]]:
    start = time.perf_counter()
    saes = [
        saekit.train(config(folder / f"alone{i}", args, hook_name=hook), model=backend).sae
        for i, hook in enumerate(HOOKS)
    ]
    _sync(args.device)
    return time.perf_counter() - start, saes


def together(backend: Any, args: argparse.Namespace, folder: Path) -> tuple[float, list[Any]]:
    start = time.perf_counter()
    out = saekit.train(config(folder / "all", args, layers="0-3"), model=backend)
    _sync(args.device)
    return time.perf_counter() - start, [out.runs[h].sae for h in HOOKS]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=409_600)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--expansion-factor", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    backend = load_model("bundled", device=args.device)
    times: dict[str, list[float]] = {"separate": [], "together": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            folder = Path(tmp) / str(r)
            t_sep, alone = separate(backend, args, folder)
            t_all, joint = together(backend, args, folder)
            times["separate"].append(t_sep)
            times["together"].append(t_all)
            for hook, a, b in zip(HOOKS, alone, joint, strict=True):
                for key, value in a.state_dict().items():
                    if not torch.equal(value, b.state_dict()[key]):
                        print(f"note: {hook} {key} differs between the two sides")
                        break
    work = len(HOOKS) * args.tokens
    t_sep, t_all = (statistics.median(times[k]) for k in ("separate", "together"))
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, "
          f"{args.tokens} tokens x {len(HOOKS)} hooks, batch {args.batch_size}, "
          f"topk k=32, {args.expansion_factor}x expansion, median of {args.repeats}")
    print(f"{'':24}{'seconds':>10}{'SAE-tok/s':>12}")
    print(f"{'four separate runs':24}{t_sep:>10.2f}{work / t_sep:>12,.0f}")
    print(f"{'one run, one pass':24}{t_all:>10.2f}{work / t_all:>12,.0f}")
    print(f"ratio (tokens/s, one pass / separate): {t_sep / t_all:.2f}x")


if __name__ == "__main__":
    main()
