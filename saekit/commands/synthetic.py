"""`saekit synthetic`: train SAEs on activations built from known sparse features and score
how well each recovers them.

Writes, under --out: one loadable SAE folder per architecture, `synthetic_results.json`
(the run's config and, per architecture, a result in SAEBench's layout), the comparison plot
`synthetic_results.png` and `ground_truth.safetensors` (the true directions, firing
probabilities, parents and groups, for later comparisons).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from saekit.commands import positive_int

RESULTS_FILE = "synthetic_results.json"
PLOT_FILE = "synthetic_results.png"
GROUND_TRUTH_FILE = "ground_truth.safetensors"

#: Flags of the generative model: (flag, SyntheticFeatures field, type).
FEATURE_FLAGS: tuple[tuple[str, str, Any], ...] = (
    ("--d", "d", int),
    ("--features", "n_features", int),
    ("--directions", "directions", str),
    ("--firing-max", "firing_max", float),
    ("--zipf-exponent", "zipf_exponent", float),
    ("--magnitude", "magnitude", str),
    ("--magnitude-mean", "magnitude_mean", float),
    ("--magnitude-spread", "magnitude_spread", float),
    ("--parents", "n_parents", int),
    ("--children-per-parent", "children_per_parent", int),
    ("--child-firing", "child_firing", float),
    ("--groups", "n_groups", int),
    ("--group-size", "group_size", int),
    ("--group-correlation", "group_correlation", float),
    ("--noise", "noise", float),
)
#: Flags of the run: (flag, SyntheticConfig field, type).
RUN_FLAGS: tuple[tuple[str, str, Any], ...] = (
    ("--d-sae", "d_sae", positive_int),
    ("--tokens", "training_tokens", positive_int),
    ("--batch-size", "batch_size", positive_int),
    ("--lr", "lr", float),
    ("--eval-samples", "eval_samples", positive_int),
    ("--device", "device", str),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    from saekit.evals.ground_truth import SyntheticConfig
    from saekit.evals.synthetic import SyntheticFeatures
    from saekit.training.fields import field_docs

    parser = subparsers.add_parser(
        "synthetic", help="train SAEs on synthetic features and score how well they recover them",
        description="Generate activations from known sparse features (Zipfian firing, "
                    "optional parent/child hierarchy, correlated groups and noise), train an "
                    "SAE of each architecture on them with the usual trainer, and score "
                    "recovery against the truth: MCC (Hungarian matching of decoder rows to "
                    "true directions), F1 of each matched latent's firing, uniqueness, "
                    "shrinkage, L0 and explained variance. docs/evaluation.md says how to "
                    "read them.",
    )
    parser.add_argument("--architecture", "--architectures", default="topk",
                        help="architectures to train, comma-separated, e.g. topk,standard "
                             "(default: topk)")
    parser.add_argument("--k", "--target-l0", dest="target_l0", type=float, default=None,
                        help=field_docs(SyntheticConfig)["target_l0"])
    parser.add_argument("--out", required=True, help="folder to write the SAEs and results to")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what --out holds")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the feature directions, the samples and the SAEs' "
                             "initialisation (default 0)")
    features = parser.add_argument_group("synthetic features")
    docs, defaults = field_docs(SyntheticFeatures), SyntheticFeatures()
    for flag, name, kind in FEATURE_FLAGS:
        default = getattr(defaults, name)
        features.add_argument(flag, dest=name, type=kind, default=default,
                              help=f"{docs[name]} (default: {default})")
    run = parser.add_argument_group("training and scoring")
    docs, run_defaults = field_docs(SyntheticConfig), SyntheticConfig()
    for flag, name, kind in RUN_FLAGS:
        default = getattr(run_defaults, name)
        shown = f" (default: {default})" if default is not None else ""
        run.add_argument(flag, dest=name, type=kind, default=default,
                         help=f"{docs[name]}{shown}")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from saekit.evals.ground_truth import SyntheticConfig, plot_synthetic
    from saekit.evals.results import saebench_record
    from saekit.evals.synthetic import SyntheticFeatures
    from saekit.preflight import check_device, check_out_folder
    from saekit.progress import status
    from saekit.training.synthetic import run_synthetic

    out = Path(args.out).expanduser()
    check_out_folder(out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(
            f"--out {args.out} already holds files; pass --overwrite to replace them, or "
            "choose another folder"
        )
    check_device(args.device, "--device")
    feature_settings = {name: getattr(args, name) for _, name, _ in FEATURE_FLAGS}
    features = SyntheticFeatures(**feature_settings, seed=args.seed)
    architectures = [a.strip() for a in args.architecture.split(",") if a.strip()]
    config = SyntheticConfig(
        features=features, architectures=architectures, target_l0=args.target_l0,
        seed=args.seed, **{name: getattr(args, name) for _, name, _ in RUN_FLAGS},
    )
    run = run_synthetic(config)
    if out.exists() and args.overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    with status(f"writing {out}"):
        for name, sae in run.saes.items():
            sae.save(out / name)
        _save_ground_truth(run.sampler, out / GROUND_TRUTH_FILE)
        records = {
            name: saebench_record(run.results[name], run.saes[name], sae_id=name)
            for name in run.saes
        }
        document = {"config": asdict(config), "expected_l0": run.sampler.expected_l0,
                    "results": records}
        (out / RESULTS_FILE).write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
        plot_synthetic(run.results, out / PLOT_FILE)
    print(format_table(run, config))
    print(f"wrote {out}: {', '.join(run.saes)}, {RESULTS_FILE}, {PLOT_FILE}, "
          f"{GROUND_TRUTH_FILE}")
    return 0


def format_table(run: Any, config: Any) -> str:
    """The printed summary: one row per architecture."""
    f = config.features
    lines = [
        f"synthetic ground truth: d={f.d}, {f.n_features} features ({f.directions}), "
        f"expected L0 {run.sampler.expected_l0:.2f}; {config.training_tokens:,} training "
        f"samples, scored on {config.eval_samples:,} held out",
        f"  {'architecture':<22}{'MCC':>7}{'F1':>7}{'unique':>8}{'shrink':>8}{'L0':>8}"
        f"{'EV':>8}",
    ]
    for name, s in run.scores.items():
        lines.append(
            f"  {name:<22}{s.mcc:>7.3f}{s.f1:>7.3f}{s.uniqueness:>8.3f}{s.l2_ratio:>8.3f}"
            f"{s.l0:>8.2f}{s.explained_variance:>8.3f}"
        )
    lines.append("  (1 is perfect for MCC, F1, unique and shrink; see docs/evaluation.md)")
    return "\n".join(lines)


def _save_ground_truth(sampler: Any, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({
        "directions": sampler.directions.contiguous(),
        "probabilities": sampler.probabilities.float().contiguous(),
        "parent": sampler.parent.contiguous(),
        "group": sampler.group.contiguous(),
    }, str(path))
