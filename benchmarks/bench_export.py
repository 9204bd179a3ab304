"""Time of a Neuronpedia export of the demo SAE: model load, statistics pass, batch files.

    taskset -c 0,1 .venv/bin/python benchmarks/bench_export.py [--sae /tmp/demo] [--threads 2]

The goal is the whole export (what `saekit export neuronpedia SAE --out DIR` does, with its
default 32,768 held-out tokens) in at most 2 minutes on 2 CPU cores. The run is timed in
phases: loading the model, the statistics pass, and writing the batches (timed again from the
statistics, as `--stats` does). The CPU time of the whole export is printed too: on a machine
shared with other work the wall time exceeds what the export itself costs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from saekit import SAE
from saekit.analysis.collect import feature_statistics
from saekit.evals.api import heldout_token_batches
from saekit.export import export_neuronpedia
from saekit.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sae", default="/tmp/demo", help="saved SAE folder (default /tmp/demo)")
    p.add_argument("--tokens", type=int, default=32_768)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sae = SAE.load(args.sae)
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), time.process_time()
        export_neuronpedia(sae, Path(tmp) / "full", n_tokens=args.tokens, progress=False)
        full, full_cpu = time.perf_counter() - start, time.process_time() - cpu

        start = time.perf_counter()
        backend = load_model(sae.cfg.metadata.model_name)
        loaded = time.perf_counter()
        context = sae.cfg.metadata.context_size or 128
        batches = heldout_token_batches(backend.tokenizer, args.tokens, context_size=context,
                                        batch_size=16)
        stats = feature_statistics(sae, backend, batches, progress=False)
        counted = time.perf_counter()
        stats.save(Path(tmp) / "stats")
        start_write = time.perf_counter()
        export_neuronpedia(sae, Path(tmp) / "again", stats=stats, model=backend, progress=False)
        written = time.perf_counter()
        size = sum(f.stat().st_size for f in (Path(tmp) / "full").rglob("*") if f.is_file())
    print(f"{args.sae}: {sae.cfg.d_sae} latents, {args.tokens} tokens, {args.threads} threads")
    print(f"  whole export                  {full:6.1f} s  ({size / 1e6:.0f} MB written; "
          f"{full_cpu:.1f} s of CPU time: on a busy machine the wall time is longer)")
    print(f"  model load                    {loaded - start:6.1f} s")
    print(f"  statistics pass               {counted - loaded:6.1f} s")
    print(f"  batch files from statistics   {written - start_write:6.1f} s")


if __name__ == "__main__":
    main()
