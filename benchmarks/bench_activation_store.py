"""Activation-store overhead and activation-cache read throughput.

    .venv/bin/python benchmarks/bench_activation_store.py [--tokens 65536] [--cache-mb 512]

1. Store overhead: the time to serve N tokens of activations through `ActivationStore`,
   against the time of the bare forward passes over the same token windows (the model's
   own cost). Overhead = (store - forward) / store; the goal is under 10%. Uses the bundled
   model when it is installed, else a random GPT-2 of similar size.
   Bare passes and store runs alternate for --rounds rounds; the medians are compared.
2. Cache reading: writes a cache of about --cache-mb MB, then reads it five times with
   `CachedActivations`, each in a fresh process (the later reads come from the page cache),
   and reports GB/s and that process's peak resident memory growth (its own memory and
   mapped files apart) against the configured buffer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch

from saekit.data import ActivationStore, TokenWindows
from saekit.data.cache import CachedActivations, write_activation_cache
from saekit.models import load_model
from saekit.models.tiny import TINY_TEXTS, tiny_gpt2, tiny_tokenizer
from saekit.training.cache_source import BATCH_RING


def texts(n: int) -> list[str]:
    if importlib.util.find_spec("saekit.assets.corpus"):
        from saekit.assets.corpus import train_texts

        return list(train_texts())[:n]
    return [TINY_TEXTS[i % len(TINY_TEXTS)] for i in range(n)]


def model_for_bench() -> tuple[object, str]:
    if importlib.util.find_spec("saekit.models.bundled"):
        try:
            return load_model("bundled"), "bundled"
        except Exception as err:  # noqa: BLE001 - fall back and say why
            print(f"bundled model unavailable ({err}); using a random GPT-2")
    return load_model(tiny_gpt2(300, n_layer=4, d_model=256), tokenizer=tiny_tokenizer()), (
        "random GPT-2 4x256"
    )


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_store(
    n_tokens: int, context_size: int, model_batch_size: int, rounds: int
) -> None:
    model, label = model_for_bench()
    hook = "blocks.1.hook_resid_post"
    docs = texts(20000)
    n_windows = n_tokens // context_size

    def windows() -> TokenWindows:
        return TokenWindows(docs, model.tokenizer, context_size)

    # Tokenize once up front (as `saekit pretokenize` does): both timings then exclude it.
    source = windows()
    batches = [b for b in iter(lambda: source.batch(model_batch_size), None)][
        : max(1, n_windows // model_batch_size)
    ]
    pretokenized = datasets.Dataset.from_dict({"input_ids": torch.cat(batches).tolist()})
    n_windows = sum(b.shape[0] for b in batches)
    model.activations(batches[0], [hook])  # warm-up

    def bare() -> float:
        begin = time.perf_counter()
        for batch in batches:
            model.activations(batch, [hook])
        return time.perf_counter() - begin

    def served() -> tuple[float, int]:
        store = ActivationStore(model, hook, pretokenized, context_size=context_size,
                                batch_size=4096, buffer_size=4096 * 4,
                                model_batch_size=model_batch_size)
        begin = time.perf_counter()
        rows = sum(batch.shape[0] for batch in store)
        return time.perf_counter() - begin, rows

    # Alternate the two, several rounds, and compare medians: on a shared machine a single
    # pair of timings can differ by more than the overhead being measured.
    forward_times, store_times = [], []
    for _ in range(rounds):
        forward_times.append(bare())
        elapsed, rows = served()
        store_times.append(elapsed)
    forward, store_s = statistics.median(forward_times), statistics.median(store_times)
    print(f"store [{label}, {hook}, context {context_size}, {model_batch_size} seq/pass, "
          f"median of {rounds} alternating rounds]")
    print(f"  bare forward passes: {forward:.2f} s for {n_windows} windows")
    print(f"  store: {store_s:.2f} s, {rows} rows served ({rows / store_s:,.0f} tokens/s)")
    print(f"  overhead: {100 * (store_s - forward) / store_s:.1f}% of the store's time")


def bench_cache(cache_mb: int, d_model: int) -> None:
    model = load_model(tiny_gpt2(300, n_layer=1, d_model=d_model), tokenizer=tiny_tokenizer())
    rows = cache_mb * 2**20 // (4 * d_model)
    folder = Path(tempfile.mkdtemp()) / "cache"
    try:
        start = time.perf_counter()
        write_activation_cache(model, "blocks.0.hook_resid_post", texts(20000) * 50, folder,
                               rows, context_size=128, model_batch_size=16, shard_rows=32768)
        written = time.perf_counter() - start
        size = sum(p.stat().st_size for p in folder.glob("shard_*"))
        print(f"cache: wrote {size / 1e9:.2f} GB ({rows} rows x {d_model}) in {written:.1f} s")
        probe = torch.randn(32768, d_model)
        start = time.perf_counter()
        for _ in range(5):
            probe.clone()
        copy_speed = 5 * probe.numel() * 4 / (time.perf_counter() - start) / 1e9
        print(f"  reference: one plain in-memory copy runs at {copy_speed:.2f} GB/s here")
        buffer_rows = 65536
        # The trainer reads with a ring of reused batch tensors (BATCH_RING); a caller who
        # keeps its batches gets new memory for each. Both, alternating, after a first read.
        attempts = [("first read", BATCH_RING)] + [
            ("page-cache read", reuse) for _ in range(2) for reuse in (0, BATCH_RING)
        ]
        for attempt, reuse in attempts:
            # A fresh process per read, so its peak RSS is the reader's alone (this process
            # peaked higher while writing the cache).
            out = subprocess.run(
                [sys.executable, __file__, "--read-cache", str(folder), "--buffer-rows",
                 str(buffer_rows), "--reuse-batches", str(reuse)],
                capture_output=True, text=True, check=True,
            ).stdout
            result = json.loads(out.strip().splitlines()[-1])
            how = f"ring of {reuse} batches (as training reads)" if reuse else "new batches"
            growth = result["rss_growth_mb"]
            print(f"  {attempt}, {how}: {result['gb_per_s']:.2f} GB/s, peak RSS growth "
                  f"while reading {growth['anon']:.0f} MB own + {growth['file']:.0f} MB "
                  f"mapped files (buffer {buffer_rows} rows = "
                  f"{buffer_rows * d_model * 4 / 2**20:.0f} MB, shard "
                  f"{32768 * d_model * 4 / 2**20:.0f} MB)")
    finally:
        shutil.rmtree(folder.parent)


def resident_mb() -> dict[str, float]:
    """This process's resident memory now (Linux), in its own memory (anon) and in mapped
    files (file: the cache's shards as the reader maps them, and library code as it is first
    run), unlike ru_maxrss, which is a lifetime peak that imports may already have set higher
    than anything the reader adds."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                key, value = line.split(":")
                found[key] = int(value.split()[0]) / 1024
    return {"anon": found["RssAnon"], "file": found["RssFile"] + found["RssShmem"]}


def read_cache(folder: str, buffer_rows: int, reuse_batches: int) -> None:
    """Read a whole cache once; print GB/s and the largest resident-memory growth seen
    (sampled at every batch) over the memory held before reading."""
    reader = CachedActivations(folder, batch_size=4096, buffer_size=buffer_rows,
                               reuse_batches=reuse_batches)
    before = resident_mb()
    growth = dict.fromkeys(before, 0.0)
    start = time.perf_counter()
    served, width = 0, 0
    for batch in reader:
        served += batch.shape[0]
        width = batch.shape[1]
        now = resident_mb()
        growth = {k: max(growth[k], now[k] - before[k]) for k in growth}
    elapsed = time.perf_counter() - start
    print(json.dumps({"gb_per_s": served * width * 4 / elapsed / 1e9,
                      "rss_growth_mb": growth}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--model-batch-size", type=int, default=16)
    parser.add_argument("--cache-mb", type=int, default=512)
    parser.add_argument("--cache-d-model", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--read-cache", help=argparse.SUPPRESS)
    parser.add_argument("--buffer-rows", type=int, default=65536, help=argparse.SUPPRESS)
    parser.add_argument("--reuse-batches", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read_cache:
        read_cache(args.read_cache, args.buffer_rows, args.reuse_batches)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_store(args.tokens, args.context_size, args.model_batch_size, args.rounds)
    bench_cache(args.cache_mb, args.cache_d_model)


if __name__ == "__main__":
    main()
