"""End-to-end training tokens/s with and without the background producer, side by side.

    python benchmarks/bench_overlap.py [--model tiny] [--tokens 16384] [--repeats 3]

`--model tiny` (the default) is a random-weight GPT-2 of 4 layers and width 256 built in
memory (nothing downloaded); any name `saekit.models.load_model` accepts works too.

Every variant trains the same SAE on the same model and text, from the model forward through
the SAE step; they alternate within one run, so the ratios hold on a shared machine. Without
the producer the forward and the step take turns; with it (saekit.data.prefetch.Prefetcher)
the next batches' forwards run in a background thread while the SAE step runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from saekit import SAE
from saekit.data import ActivationStore
from saekit.data.prefetch import Prefetcher
from saekit.models import load_model
from saekit.training import SAEJob, Trainer, TrainingConfig


def texts() -> list[str]:
    try:
        from saekit.assets.corpus import train_texts

        return list(train_texts())
    except (ImportError, FileNotFoundError):
        from saekit.models.tiny import TINY_TEXTS

        return list(TINY_TEXTS) * 200


def model(name: str, layers: int, width: int) -> object:
    if name != "tiny":
        return load_model(name)
    from saekit.models.tiny import tiny_gpt2, tiny_tokenizer

    return load_model(tiny_gpt2(300, n_layer=layers, d_model=width), tokenizer=tiny_tokenizer())


def run_once(
    backend: object,
    hook: str,
    data: list[str],
    args: argparse.Namespace,
    producer: bool,
    threads: int,
) -> float:
    store = ActivationStore(
        backend, hook, data, context_size=args.context, batch_size=args.batch,
        buffer_size=args.batch * 4, model_batch_size=args.model_batch, seed=0,
    )
    d_in = store.d_in
    torch.manual_seed(0)
    sae = SAE.create("topk", d_in, d_in * args.expansion, k=args.k)
    cfg = TrainingConfig(tokens=args.tokens, batch_size=args.batch, b_dec_init="mean")
    start = time.perf_counter()
    source: Any = store
    # A buffer's worth of batches ahead: the store makes them in bursts, one buffer fill at
    # a time, and the producer must cover a whole fill.
    depth = args.depth or store.buffer_size // store.batch_size
    if producer:
        source = Prefetcher(store, depth=depth)
    # With a producer, the forward and the step each get their share of the cores (two
    # teams of all the threads would oversubscribe them).
    torch.set_num_threads(threads)
    Trainer(SAEJob(sae, cfg), source).fit()
    elapsed = time.perf_counter() - start
    if producer:
        source.close()
    torch.set_num_threads(args.threads)
    return args.tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--layers", type=int, default=4, help="--model tiny: layers")
    parser.add_argument("--width", type=int, default=256, help="--model tiny: d_model")
    parser.add_argument("--hook", default=None, help="default: the middle resid_pre")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--model-batch", type=int, default=8)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--depth", type=int, default=None,
                        help="batches made ahead (default: the buffer's, as training uses)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads without the producer; with it, half each side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backend = model(args.model, args.layers, args.width)
    layers = sorted(
        int(h.split(".")[1]) for h in backend.hook_names()
        if h.startswith("blocks.") and h.endswith(".hook_resid_pre")
    )
    hook = args.hook or f"blocks.{layers[len(layers) // 2]}.hook_resid_pre"
    data = texts()
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), model {args.model}, hook {hook}, "
        f"{args.tokens} tokens per run, batch {args.batch}, expansion {args.expansion}"
    )
    run_once(backend, hook, data, args, False, args.threads)  # warm-up
    # The last variant takes turns like the first but with the producers' thread count, to
    # tell the gain of overlapping from the gain of running fewer threads per operation.
    half = max(1, args.threads // 2)
    variants = {
        f"taking turns, {args.threads} thread(s)": (False, args.threads),
        f"producer, {half} thread(s) each side": (True, half),
        f"taking turns, {half} thread(s)": (False, half),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (producer, threads) in variants.items():
            rates[name].append(run_once(backend, hook, data, args, producer, threads))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        print(f"  {name:46s} {medians[name]:9.0f} tokens/s  (runs: {_fmt(values)})")
    plain, overlapped, fewer = medians.values()
    print(f"  overlap gain: {overlapped / plain:.2f}x over the first, "
          f"{overlapped / fewer:.2f}x over the third")


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


if __name__ == "__main__":
    main()
