"""saekit side by side with SAELens: same model weights, tokens, SAE config and token budget.

    .venv/bin/python benchmarks/bench_vs_saelens.py [--tokens 409600] [--model-dir DIR]

What it does:

1. Makes sure a throw-away virtual environment with sae-lens exists (default /tmp/saelens6;
   created with `python3 -m venv`, then torch, then sae-lens, when missing).
2. Converts the bundled model for SAELens: a `HookedTransformer` config (JSON) and state dict
   (safetensors) that the SAELens side rebuilds; the tokenizer is read from the model folder.
3. Tokenizes the bundled corpus's training split once (context 128, BOS first) and writes the
   windows to a file; both libraries read these windows, in the same order, as a pretokenized
   dataset, and both leave out special-token (BOS/EOS) positions.
4. Trains each SAE (topk 16x k=64, standard 16x) with each library in its own subprocess, with
   the same hook, token budget, batch size, learning rate, seed, norm-scaling estimate and
   b_dec start (zero: SAELens has no other; `--b-dec-init` sets saekit's). The
   child times the training call itself (activation store, norm estimate, training, saving;
   the model is loaded before the clock starts); the parent reads the child's peak resident
   memory from `os.wait4`.
5. Loads both saved SAEs with saekit and evaluates them together on the same held-out tokens,
   then prints tokens/s, peak memory, explained variance and dead fraction, and the ratios.

Both use the same dead-latent window (saekit's default for the run: a tenth of it, at most
1M tokens; SAELens counts it in steps), so AuxK starts at the same step in both. Each library
keeps its own defaults for what the comparison does not fix; those are part of what is
compared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Only the standard library at module level: the SAELens child runs this file in another venv.
SAELENS_VERSION = "6.54.12"
TORCH_VERSION = "2.13.0"
DEFAULT_VENV = Path("/tmp/saelens6")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: Batches both libraries read to estimate the activation norm factor (saekit's run default).
NORM_BATCHES = 20
#: Shuffle-buffer rows saekit's run uses for a batch size
#: (saekit.training.activations.model_or_cache_store); SAELens gets the same number of rows,
#: as n_batches_in_buffer * context_size.
def buffer_rows(batch_size: int) -> int:
    return max(batch_size * 8, 16_384)


def dead_window(tokens: int, batch_size: int) -> int:
    """saekit's default dead-latent window for the run, in tokens (both libraries use it)."""
    from saekit.training.config import TrainingSection

    return TrainingSection(tokens=tokens, batch_size=batch_size).dead_window


#: Issue targets: saekit tokens/s over SAELens's, per architecture.
SPEED_TARGETS = {"topk": 3.0, "standard": 1.5}


# ----- the parent: environment, data, model conversion ------------------------------------


def ensure_saelens_venv(venv: Path) -> Path:
    """The venv's python, after installing sae-lens into it when it is missing."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import sae_lens, torch; print(sae_lens.__version__)"]
    if python.exists():
        found = subprocess.run(probe, capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip() == SAELENS_VERSION:
            return python
    print(f"setting up sae-lens {SAELENS_VERSION} in {venv} (one-off, several minutes)")
    if not python.exists():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    # torch first and pinned, so that sae-lens's resolver keeps it instead of picking another.
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run([*pip, f"sae-lens=={SAELENS_VERSION}", f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run(probe, check=True)
    return python


def write_token_windows(model_dir: Path, path: Path, n_windows: int, context: int) -> int:
    """The first n_windows windows of the training split, [n, context] int64, to `path`."""
    import torch
    from safetensors.torch import save_file

    from saekit.assets.corpus import train_texts
    from saekit.data import TokenWindows
    from saekit.models.bundled import load_bundled_tokenizer

    tokenizer = load_bundled_tokenizer(model_dir)
    windows = TokenWindows(train_texts(), tokenizer, context, prepend_bos=True)
    batches, got = [], 0
    while got < n_windows:
        batch = windows.batch(min(256, n_windows - got))
        if batch is None:
            break
        batches.append(batch)
        got += batch.shape[0]
    save_file({"tokens": torch.cat(batches).to(torch.int64).contiguous()}, str(path))
    return got


def convert_model(model_dir: Path, work: Path) -> None:
    """HookedTransformer config + weights (no folding), for the SAELens side to rebuild."""
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from saekit.models.bundled import load_bundled_hooked_transformer

    model = load_bundled_hooked_transformer(model_dir=model_dir)
    fields = {}
    for f in dataclasses.fields(model.cfg):
        value = getattr(model.cfg, f.name)
        if not f.init or f.name in ("device", "dtype"):
            continue
        try:
            json.dumps(value)
        except TypeError:
            continue
        fields[f.name] = value
    (work / "tl_config.json").write_text(json.dumps(fields, indent=1))
    # clone(): safetensors refuses tensors that share storage (e.g. tied views).
    state = {k: v.detach().to(torch.float32).contiguous().clone()
             for k, v in model.state_dict().items()}
    save_file(state, str(work / "tl_model.safetensors"))


# ----- the children -------------------------------------------------------------------------


def child_saekit(spec: dict[str, Any]) -> dict[str, Any]:
    import datasets
    from safetensors.torch import load_file

    import saekit
    from saekit.models import load_model
    from saekit.training.config import TrainConfig

    tokens = load_file(spec["tokens_file"])["tokens"]
    dataset = datasets.Dataset.from_dict({"input_ids": tokens.tolist()})
    backend = load_model(spec["model_dir"], device="cpu")
    sae: dict[str, Any] = {
        "architecture": spec["architecture"], "expansion_factor": spec["expansion"],
    }
    training: dict[str, Any] = {
        "tokens": spec["tokens"], "batch_size": spec["batch_size"], "lr": spec["lr"],
        "b_dec_init": spec["b_dec_init"], "dead_after_tokens": spec["dead_window"],
    }
    if spec["architecture"] == "topk":
        sae["k"] = spec["k"]
    elif spec.get("target_l0"):
        training["target_l0"] = spec["target_l0"]
    else:
        training["sparsity_coefficient"] = spec["l1_coefficient"]
    # None: saekit's own default for that setting.
    training = {key: value for key, value in training.items() if value is not None}
    cfg = TrainConfig.from_dict({
        "sae": sae,
        "data": {"model": spec["model_name"], "hook_name": spec["hook"], "context_size":
                 spec["context"], "eval_tokens": 0},
        "training": training,
        # One checkpoint at most (none before the end), as SAELens's default n_checkpoints=0.
        "run": {"out": spec["out"], "seed": spec["seed"], "progress": False, "overwrite": True,
                "checkpoint_every": spec["tokens"], "device": "cpu"},
    })
    start = time.perf_counter()
    saekit.train(cfg, model=backend, dataset=dataset)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "folder": spec["out"]}


def child_saelens(spec: dict[str, Any]) -> dict[str, Any]:
    import datasets
    import torch
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        StandardTrainingSAEConfig,
        TopKTrainingSAEConfig,
    )
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    work = Path(spec["work"])
    tl_cfg = HookedTransformerConfig(
        **json.loads((work / "tl_config.json").read_text()), device="cpu", dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = HookedTransformer(tl_cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_state_dict(load_file(str(work / "tl_model.safetensors")), strict=True)
    model.eval()
    tokens = load_file(spec["tokens_file"])["tokens"]
    dataset = datasets.Dataset.from_dict({"input_ids": tokens.tolist()})

    d_in = tl_cfg.d_model
    # saekit scales activations to norm sqrt(d_in) by default; SAELens's same setting is
    # "expected_average_only_in" (its own default is "none").
    common = {"d_in": d_in, "d_sae": spec["expansion"] * d_in, "device": "cpu",
              "dtype": "float32",
              "normalize_activations": spec.get("saelens_normalize", "expected_average_only_in")}
    if spec["architecture"] == "topk":
        sae_cfg: Any = TopKTrainingSAEConfig(k=spec["k"], **common)
    else:
        sae_cfg = StandardTrainingSAEConfig(l1_coefficient=spec["l1_coefficient"], **common)
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name=tl_cfg.model_name,
        hook_name=spec["hook"],
        dataset_path=spec["tokens_file"],
        is_dataset_tokenized=True,
        streaming=False,
        context_size=spec["context"],
        prepend_bos=True,
        exclude_special_tokens=True,
        training_tokens=spec["tokens"],
        train_batch_size_tokens=spec["batch_size"],
        lr_scheduler_name="constant",
        # None: SAELens's own defaults (its lr, and its dead window in steps).
        **({} if spec["lr"] is None else {"lr": spec["lr"]}),
        # Dead once unfired for more than this many steps (saekit: for window tokens).
        **({} if spec["dead_window"] is None
           else {"dead_feature_window": spec["dead_window"] // spec["batch_size"]}),
        n_batches_for_norm_estimate=NORM_BATCHES,
        # Its default (20) gives a 2,560-row buffer at context 128, smaller than one batch.
        n_batches_in_buffer=buffer_rows(spec["batch_size"]) // spec["context"],
        device="cpu",
        seed=spec["seed"],
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=str(Path(spec["out"]) / "checkpoints"),
        output_path=spec["out"],
        verbose=False,
    )
    start = time.perf_counter()
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)
    runner.run()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "folder": spec["out"]}


def run_child(python: str, library: str, spec: dict[str, Any], log: Path) -> dict[str, Any]:
    """Run one training in a fresh process; its own timing plus its peak RSS from wait4."""
    spec_file = log.with_suffix(".spec.json")
    spec_file.write_text(json.dumps(spec))
    result_file = log.with_suffix(".result.json")
    result_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="disabled")
    if spec["threads"]:
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    with log.open("w") as out:
        proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--child", library, "--spec", str(spec_file),
             "--result", str(result_file)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=spec["out_parent"],
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not result_file.exists():
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{library} run failed (exit {proc.returncode}); log {log}:\n{tail}")
    result = json.loads(result_file.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux reports kilobytes
    result["tokens_per_s"] = spec["tokens"] / result["seconds"]
    return result


# ----- evaluation and the table -------------------------------------------------------------


def evaluate_folders(
    model_dir: Path, folders: dict[tuple[str, str], str], eval_tokens: int, downstream: bool
) -> dict[tuple[str, str], Any]:
    """Every SAE with saekit's evaluator, in one pass over the same held-out tokens."""
    from saekit import SAE
    from saekit.evals import evaluate_many
    from saekit.models import load_model

    keys = list(folders)
    saes = [SAE.load(folders[key]) for key in keys]
    backend = load_model(str(model_dir), device="cpu")
    metrics = evaluate_many(saes, model=backend, tokens=eval_tokens, downstream=downstream)
    return dict(zip(keys, metrics, strict=True))


def print_table(rows: dict[tuple[str, str], dict[str, Any]], architectures: list[str]) -> None:
    header = (f"{'arch':9s} {'library':8s} {'tok/s':>8s} {'train s':>8s} {'peak MB':>8s} "
              f"{'EV':>7s} {'dead':>7s} {'L0':>7s} {'CE score':>9s}")
    print("\n" + header + "\n" + "-" * len(header))
    for arch in architectures:
        for lib in ("saekit", "saelens"):
            r = rows[(arch, lib)]
            ce = "-" if r.get("ce_loss_score") is None else f"{r['ce_loss_score']:.4f}"
            print(f"{arch:9s} {lib:8s} {r['tokens_per_s']:8.0f} {r['seconds']:8.1f} "
                  f"{r['peak_rss_mb']:8.0f} {r['explained_variance']:7.4f} "
                  f"{r['dead_fraction']:7.2%} {r['l0']:7.1f} {ce:>9s}")
    print("\nsaekit vs SAELens (targets in brackets):")
    for arch in architectures:
        a, b = rows[(arch, "saekit")], rows[(arch, "saelens")]
        speed = a["tokens_per_s"] / b["tokens_per_s"]
        memory = a["peak_rss_mb"] / b["peak_rss_mb"]
        ev = a["explained_variance"] - b["explained_variance"]
        dead = a["dead_fraction"] - b["dead_fraction"]
        target = SPEED_TARGETS.get(arch, 1.0)
        checks = {
            f"tokens/s {speed:.2f}x [>= {target}x]": speed >= target,
            f"EV {ev:+.4f} [>= -0.01]": ev >= -0.01,
            f"dead {dead:+.2%} [<= 0]": dead <= 0,
            f"peak memory {memory:.2f}x [<= 1]": memory <= 1,
        }
        verdicts = ", ".join(f"{k} {'ok' if ok else 'MISSED'}" for k, ok in checks.items())
        print(f"  {arch}: {verdicts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=409_600,
                        help="training tokens per run (default 100 steps of 4096)")
    parser.add_argument("--architectures", nargs="+", default=["topk", "standard"],
                        choices=["topk", "standard"])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--l1-coefficient", type=float, default=5.0,
                        help="standard SAE's sparsity coefficient (same loss in both libraries)")
    parser.add_argument("--b-dec-init", default="zeros",
                        choices=["zeros", "mean", "geometric_median"],
                        help="saekit's start for b_dec (default zeros: SAELens always starts "
                        "it at zero, so the two train the same SAE config; saekit's own "
                        "default is geometric_median)")
    parser.add_argument("--hook", default="blocks.2.hook_resid_pre")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=65_536)
    parser.add_argument("--downstream", action="store_true",
                        help="also compute the CE-loss score (slower)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in both children (default: torch's own choice)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="GPT-2 folder with tokenizer (default: the bundled model)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for tokens, converted model, runs and logs (default: a "
                        "new temporary folder, kept)")
    parser.add_argument("--child", choices=["saekit", "saelens"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        spec = json.loads(args.spec.read_text())
        if spec["threads"]:
            import torch

            torch.set_num_threads(spec["threads"])
        run = child_saekit if args.child == "saekit" else child_saelens
        args.result.write_text(json.dumps(run(spec)))
        return

    python = str(ensure_saelens_venv(args.venv))
    bundled = args.model_dir is None
    if bundled:
        from saekit.models.bundled import BUNDLED_MODEL_DIR

        args.model_dir = BUNDLED_MODEL_DIR
    model_dir = args.model_dir.resolve()
    work = (args.work or Path(tempfile.mkdtemp(prefix="saekit_vs_saelens_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}\nmodel: {model_dir}")

    # Enough windows for the budget plus what either library reads besides it: SAELens's norm
    # estimate consumes batches, and both fill a shuffle buffer ahead of training.
    needed = args.tokens + (NORM_BATCHES + 4) * args.batch_size + 2 * buffer_rows(args.batch_size)
    n_windows = math.ceil(needed / (args.context - 2))
    tokens_file = work / "train_tokens.safetensors"
    got = write_token_windows(model_dir, tokens_file, n_windows, args.context)
    if got < n_windows:
        print(f"warning: the training split gave {got} windows of the {n_windows} wanted")
    convert_model(model_dir, work)
    print(f"{got} token windows of {args.context} and the converted model written")

    rows: dict[tuple[str, str], dict[str, Any]] = {}
    base = {
        "tokens": args.tokens, "batch_size": args.batch_size, "lr": args.lr, "k": args.k,
        "expansion": args.expansion, "l1_coefficient": args.l1_coefficient,
        "b_dec_init": args.b_dec_init, "dead_window": dead_window(args.tokens, args.batch_size),
        "hook": args.hook, "context": args.context, "seed": args.seed, "threads": args.threads,
        "model_dir": str(model_dir), "model_name": "bundled" if bundled else str(model_dir),
        "tokens_file": str(tokens_file), "work": str(work),
        "out_parent": str(work),
    }
    for i, arch in enumerate(args.architectures):
        # Alternate which library goes first, so slow drift in the machine's load does not
        # always favour the same one.
        order = ("saekit", "saelens") if i % 2 == 0 else ("saelens", "saekit")
        for lib in order:
            out = work / f"{arch}_{lib}"
            shutil.rmtree(out, ignore_errors=True)
            spec = dict(base, architecture=arch, out=str(out))
            child_python = sys.executable if lib == "saekit" else python
            print(f"training {arch} with {lib} ...", flush=True)
            rows[(arch, lib)] = run_child(child_python, lib, spec, work / f"{arch}_{lib}.log")
            r = rows[(arch, lib)]
            print(f"  {r['tokens_per_s']:.0f} tokens/s ({r['seconds']:.1f} s), "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)

    print(f"evaluating all SAEs with saekit on {args.eval_tokens} held-out tokens ...")
    folders = {key: r["folder"] for key, r in rows.items()}
    metrics = evaluate_folders(model_dir, folders, args.eval_tokens, args.downstream)
    for key, m in metrics.items():
        rows[key].update(explained_variance=m.explained_variance, dead_fraction=m.dead_fraction,
                         l0=m.l0, ce_loss_score=m.ce_loss_score)
    print_table(rows, args.architectures)
    summary = {f"{a}/{lib}": r for (a, lib), r in rows.items()}
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nsummary written to {work / 'summary.json'}")


if __name__ == "__main__":
    main()
