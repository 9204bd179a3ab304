"""SAE training-step throughput per architecture and width, next to the matmul peak.

Everything is measured in one run, interleaved (each round times the matmul peak and then
one step of every architecture), so the ratios hold even on a shared machine:

    python benchmarks/bench_sae_step.py [--d-in 256] [--expansions 8 16] [--batch 4096]

For each architecture it prints tokens/s of a full step (forward, loss, backward, Adam), the
FLOP rate of the matmul work the step cannot avoid (see `INHERENT_MATMULS`), its fraction of
the measured matmul peak, and for topk the speed-up over standard.

The peak is the encoder-shaped matmul [batch, d_in] x [d_in, d_sae], timed two ways: with a
freshly allocated output, as `a @ b` and as every new tensor in a step pays for it (on Linux
CPUs, large allocations are fresh pages, page-faulted on first write), and into a preallocated
output, the matmul kernel alone. The fraction of peak is given against both.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from saekit import SAE, LossSettings

ARCHITECTURES = ("standard", "jumprelu", "gated", "topk", "topk_dense", "batchtopk")

#: Matmuls of batch x d_in x d_sae (2 * batch * d_in * d_sae FLOPs each) inherent to one
#: training step. Dense SAEs: encoder and decoder forward; backward, the decoder's weight and
#: input gradients and the encoder's weight gradient. The encoder's input gradient is not
#: needed: the input is data, and b_dec's gradient through the centring x - b_dec is a
#: vector-matrix product. Gated adds its auxiliary reconstruction through the frozen decoder:
#: a forward matmul and its input gradient (the gate and magnitude paths share one encoder
#: matmul, x (W_enc * exp(r_mag)) = (x W_enc) * exp(r_mag)). topk-style SAEs do less than
#: this through the sparse kernel; they are counted at the dense figure ("dense-equivalent").
INHERENT_MATMULS = {"gated": 7}
DENSE_MATMULS = 5


def median_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, after one warm-up call each, timed in
    rounds that call every function once, so that load changes hit all of them alike."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def peak_fns(batch: int, d_in: int, d_sae: int) -> dict[str, Callable[[], object]]:
    """The encoder-shaped matmul with a new output per call, and into a preallocated one."""
    a, b = torch.randn(batch, d_in), torch.randn(d_in, d_sae)
    out = torch.empty(batch, d_sae)
    return {
        "peak (new output)": lambda: a @ b,
        "peak (kernel)": lambda: torch.mm(a, b, out=out),
    }


def step_fn(name: str, d_in: int, d_sae: int, k: int, batch: int) -> Callable[[], None]:
    architecture = "topk" if name == "topk_dense" else name
    fields = {"k": k} if "topk" in architecture else {}
    sae = SAE.create(architecture, d_in, d_sae, **fields)
    settings = LossSettings(sparsity_coefficient=1e-3, use_sparse_kernel=name != "topk_dense")
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(batch, d_in)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        sae.training_forward(x, settings=settings).loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--expansions", type=int, nargs="+", default=[16])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for expansion in args.expansions:
        d_sae = args.d_in * expansion
        matmul_flops = 2 * args.batch * args.d_in * d_sae
        fns = peak_fns(args.batch, args.d_in, d_sae)
        for name in args.architectures:
            fns[name] = step_fn(name, args.d_in, d_sae, args.k, args.batch)
        seconds = median_times(fns, args.repeats)
        peak = matmul_flops / seconds["peak (new output)"]
        kernel_peak = matmul_flops / seconds["peak (kernel)"]
        print(
            f"\nd_in={args.d_in} d_sae={d_sae} batch={args.batch}: matmul peak "
            f"{peak / 1e9:.1f} GFLOP/s with a new output, {kernel_peak / 1e9:.1f} GFLOP/s "
            "into a preallocated one (kernel)"
        )
        rates: dict[str, float] = {}
        for name in args.architectures:
            rates[name] = args.batch / seconds[name]
            matmuls = INHERENT_MATMULS.get(name, DENSE_MATMULS)
            flops = matmuls * matmul_flops / seconds[name]
            label = "dense-equivalent" if "topk" in name else f"{matmuls} matmuls"
            print(
                f"  {name:12s} {rates[name]:10.0f} tokens/s   {label:16s} "
                f"{flops / 1e9:6.1f} GFLOP/s = {flops / peak:6.1%} of peak "
                f"({flops / kernel_peak:6.1%} of kernel peak)"
            )
        if "topk" in rates and "standard" in rates:
            print(f"  topk / standard tokens/s: {rates['topk'] / rates['standard']:.2f}x")
        if "topk" in rates and "topk_dense" in rates:
            print(f"  topk sparse kernel / dense: {rates['topk'] / rates['topk_dense']:.2f}x")


if __name__ == "__main__":
    main()
