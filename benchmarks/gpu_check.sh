#!/usr/bin/env bash
# GPU check, under 5 minutes: the sparse top-k kernel against its dense twin, then benchmark 1
# (SAE step throughput next to the matmul peak) on the first CUDA device.
#
#   bash benchmarks/gpu_check.sh [PYTHON]
#
# PYTHON defaults to the repository's .venv/bin/python, else python3. Every path is relative to
# the repository root (found from this script's place), so it runs from any checkout.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ $# -ge 1 ]]; then
  PY="$1"
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
else
  PY=python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== device"
"$PY" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch (torch.cuda.is_available() is False); "
             "run this on a GPU machine with a CUDA build of torch")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF

echo "== kernel equivalence tests (tests/test_sparse_topk_kernel.py, CPU references)"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_sparse_topk_kernel.py

echo "== kernel equivalence on the GPU (sparse path vs dense twin, float64 and float32)"
timeout 90 "$PY" - <<'EOF'
import torch

from saekit import SAE, LossSettings
from saekit.kernels.sparse_topk import (
    batch_topk_pairs, dense_decode, encoder_pre_activations, sparse_decode, topk_pairs,
)

dev = torch.device("cuda")


def run(decode, params, select, k, weight):
    leaves = {n: t.clone().requires_grad_(True) for n, t in params.items()}
    pre = encoder_pre_activations(leaves["x"], leaves["W_enc"], leaves["b_enc"])
    token, latent = select(torch.relu(pre), k)
    recon, values = decode(leaves["x"], leaves["W_enc"], leaves["b_enc"], leaves["W_dec"],
                           leaves["b_dec"], pre, token, latent)
    ((recon * weight).sum() + 0.3 * (values**2).sum()).backward()
    return recon, values, {n: t.grad for n, t in leaves.items()}


# float32 matmuls on the GPU may use TF32; the check compares like with like, exactly.
torch.backends.cuda.matmul.allow_tf32 = False
cases = [(7, 5, 16, 1), (9, 6, 12, 12), (33, 17, 64, 8), (512, 256, 4096, 64)]
for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-3)):
    for select in (topk_pairs, batch_topk_pairs):
        for batch, d_in, d_sae, k in cases:
            g = torch.Generator(device=dev).manual_seed(batch + d_sae + k)
            p = {
                "x": torch.randn(batch, d_in, generator=g, device=dev, dtype=dtype),
                "W_enc": torch.randn(d_in, d_sae, generator=g, device=dev, dtype=dtype),
                "b_enc": 0.5 * torch.randn(d_sae, generator=g, device=dev, dtype=dtype),
                "W_dec": torch.randn(d_sae, d_in + 2, generator=g, device=dev, dtype=dtype),
                "b_dec": torch.randn(d_in + 2, generator=g, device=dev, dtype=dtype),
            }
            w = torch.randn(batch, d_in + 2, generator=g, device=dev, dtype=dtype)
            fast, slow = run(sparse_decode, p, select, k, w), run(dense_decode, p, select, k, w)
            scale = max(1.0, slow[0].abs().max().item())
            assert torch.allclose(fast[0], slow[0], atol=tol * scale, rtol=tol), "recon"
            assert torch.allclose(fast[1], slow[1], atol=tol * scale, rtol=tol), "values"
            for name in p:
                ref = slow[2][name]
                s = max(1.0, ref.abs().max().item())
                assert torch.allclose(fast[2][name], ref, atol=tol * s, rtol=tol), name
print("sparse_decode == dense_decode on cuda: outputs and gradients, k=1 and k=d_sae included")

x = torch.randn(256, 64, device=dev, dtype=torch.float64)
for architecture in ("topk", "batchtopk"):
    out = []
    for use_kernel in (True, False):
        torch.manual_seed(0)
        sae = SAE.create(architecture, 64, 512, k=8, device="cuda", dtype="float64")
        res = sae.training_forward(x, settings=LossSettings(use_sparse_kernel=use_kernel))
        res.loss.backward()
        out.append((res.loss.detach(), {n: q.grad.clone() for n, q in sae.named_parameters()}))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-9), architecture
    for name in out[0][1]:
        assert torch.allclose(out[0][1][name], out[1][1][name], atol=1e-8), name
print("training_forward with and without the kernel agree on cuda (topk, batchtopk)")
EOF

echo "== benchmark 1 on the GPU (benchmarks/bench_sae_step.py, run unchanged with its tensors"
echo "   and SAEs placed on cuda and each timed call synchronised)"
timeout 150 "$PY" - <<'EOF'
import importlib.util
import sys

import torch

spec = importlib.util.spec_from_file_location("bench_sae_step", "benchmarks/bench_sae_step.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

# Tensors the benchmark makes with torch.randn land on the GPU; SAEs get device="cuda".
torch.set_default_device("cuda")
SAE = bench.SAE


class SAEOnGPU:
    @staticmethod
    def create(architecture, d_in, d_sae, **fields):
        return SAE.create(architecture, d_in, d_sae, device="cuda", **fields)


bench.SAE = SAEOnGPU
untimed = bench.timed


def timed(fn, repeats):
    # Kernels run asynchronously: wait for each call to finish inside the timed region.
    def synced():
        fn()
        torch.cuda.synchronize()

    return untimed(synced, max(repeats, 10))


bench.timed = timed
for args in (["--d-in", "256", "--expansions", "16"],
             ["--d-in", "2048", "--expansions", "16", "--batch", "4096"]):
    sys.argv = ["bench_sae_step.py", *args]
    bench.main()
EOF
echo "== done"
