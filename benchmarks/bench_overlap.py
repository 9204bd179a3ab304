"""End-to-end training tokens/s with and without the background producer, side by side.

    python benchmarks/bench_overlap.py [--model tiny] [--tokens 16384] [--repeats 3]

`--model tiny` (the default) is a random-weight GPT-2 of 4 layers and width 256 built in
memory (nothing downloaded); any name `saekit.models.load_model` accepts works too.

Every variant trains the same SAE on the same model and text, from the model forward through
the SAE step; they alternate within one run, so the ratios hold on a shared machine. Without
the producer the forward and the step take turns; with it (saekit.data.prefetch.Prefetcher)
the next batches' forwards run in a background thread while the SAE step runs.

`--ceiling` also measures the most any overlap could give on this machine: the forward and
the step each alone on one thread, then both at once in two separate processes (no shared
interpreter, nothing to wait for). Overlap cannot beat the slower of the two side by side.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch

from saekit import SAE
from saekit.data import ActivationStore
from saekit.data.prefetch import Prefetcher
from saekit.models import load_model
from saekit.training import SAEJob, Trainer, TrainingSection


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


def make_store(backend: object, hook: str, data: list[str], args: argparse.Namespace) -> Any:
    return ActivationStore(
        backend, hook, data, context_size=args.context, batch_size=args.batch,
        buffer_size=args.batch * 4, model_batch_size=args.model_batch, seed=0,
    )


def make_sae(d_in: int, args: argparse.Namespace) -> SAE:
    torch.manual_seed(0)
    return SAE.create("topk", d_in, d_in * args.expansion, k=args.k)


def run_once(
    backend: object,
    hook: str,
    data: list[str],
    args: argparse.Namespace,
    producer: bool,
    threads: int,
) -> float:
    store = make_store(backend, hook, data, args)
    sae = make_sae(store.d_in, args)
    cfg = TrainingSection(tokens=args.tokens, batch_size=args.batch, b_dec_init="mean")
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


def part_worker(
    part: str, args: argparse.Namespace, hook: str, barrier: Any, results: Any
) -> None:
    """Time one part on one thread: the store making batches (model forward included), or
    the SAE step on batches made before the clock starts. `barrier` lines up the start with
    the other part's process; the times of finished batches go back through `results`."""
    torch.set_num_threads(1)
    store = make_store(model(args.model, args.layers, args.width), hook, texts(), args)
    n = args.tokens // args.batch
    batches = [next(store).clone() for _ in range(n)] if part == "step" else []
    barrier.wait()
    start = time.perf_counter()
    finished: list[float] = []
    if part == "forward":
        for _ in range(n):
            next(store)
            finished.append(time.perf_counter())
    else:
        def timed() -> Iterator[torch.Tensor]:
            for i, batch in enumerate(batches):
                if i:  # asked for the next batch: the step on the last one is done
                    finished.append(time.perf_counter())
                yield batch

        cfg = TrainingSection(tokens=n * args.batch, batch_size=args.batch, b_dec_init="mean")
        Trainer(SAEJob(make_sae(store.d_in, args), cfg), timed()).fit()
        finished.append(time.perf_counter())
    results.put((part, start, finished))


def overlap_ceiling(args: argparse.Namespace, hook: str) -> dict[tuple[str, bool], float]:
    """tokens/s of the forward and of the step, each alone and both at once, keyed by (part,
    together). Side by side, each rate counts the batches finished while both still ran."""
    context = multiprocessing.get_context("spawn")
    rates = {}
    for together in (False, True):
        groups = [("forward", "step")] if together else [("forward",), ("step",)]
        for group in groups:
            barrier, results = context.Barrier(len(group)), context.Queue()
            workers = [
                context.Process(target=part_worker, args=(part, args, hook, barrier, results))
                for part in group
            ]
            for worker in workers:
                worker.start()
            timings = [results.get() for _ in group]
            for worker in workers:
                worker.join()
            end = min(finished[-1] for _, _, finished in timings)
            for part, start, finished in timings:
                done = sum(1 for t in finished if t <= end)
                rates[part, together] = done * args.batch / (end - start)
    return rates


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
    parser.add_argument("--ceiling", action="store_true",
                        help="also measure the forward and the step alone and side by side")
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
    if args.ceiling:
        rates_by = overlap_ceiling(args, hook)
        for part in ("forward", "step"):
            alone, together = rates_by[part, False], rates_by[part, True]
            print(f"  {part} on 1 thread: {alone:9.0f} tokens/s alone, {together:9.0f} beside "
                  f"the other in its own process ({together / alone:.2f}x)")
        ceiling = min(rates_by["forward", True], rates_by["step", True])
        print(f"  overlap ceiling (the slower part, side by side): {ceiling:.0f} tokens/s, "
              f"{ceiling / plain:.2f}x the first")


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


if __name__ == "__main__":
    main()
