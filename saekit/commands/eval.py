"""`saekit eval TARGET...`: every standard metric of one or more SAEs on held-out text.

Writes, under --out: `metrics.csv` (a row per SAE) and, per SAE, a folder with
`metrics.json`, `feature_stats.safetensors` (per-latent firing frequency, mean activation
when firing, max activation) and `feature_density.png`. SAEs that read several sites at once
(CLTs, crosscoders) are refused: `evaluate_clt` and `evaluate_crosscoder` evaluate them.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
from pathlib import Path
from typing import Any

from saekit.commands import positive_int
from saekit.commands.report import format_metrics
from saekit.evals.api import DEFAULT_EVAL_TOKENS, evaluate_many
from saekit.evals.metrics import METRIC_NAMES, EvalMetrics, json_safe
from saekit.sites import check_one_site
from saekit.targets import load_target, resolve_model

logger = logging.getLogger(__name__)

class _RenamedFlag(argparse.Action):
    """An old flag name that still works, with a warning that names the new one."""

    def __init__(self, option_strings: list[str], dest: str, new_flag: str, **kwargs: Any):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
        option_string: str | None = None,
    ) -> None:
        logger.warning(
            "%s is deprecated here; use %s (sequences per model forward pass; "
            "`saekit train --batch-size` is tokens per optimisation step)",
            option_string, self.new_flag,
        )
        setattr(namespace, self.dest, values)


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    """--backend, as `saekit.models.load_model` takes it."""
    from saekit.models.loading import BACKENDS

    parser.add_argument(
        "--backend", default="auto", choices=BACKENDS,
        help="library that runs the model (default: auto: TransformerLens for official "
        "TransformerLens model names, Hugging Face otherwise)",
    )


def add_model_batch_size(parser: argparse.ArgumentParser, default: int) -> None:
    """--model-batch-size: sequences per model forward pass, as in `saekit cache`; the old
    --batch-size still works here, with a warning."""
    parser.add_argument(
        "--model-batch-size", type=positive_int, default=default,
        help="sequences per model forward pass (default %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, dest="model_batch_size", action=_RenamedFlag,
        new_flag="--model-batch-size", help=argparse.SUPPRESS,
    )


def add_text_source(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, tokens: int, what: str
) -> None:
    """--backend, --model, --dataset, --tokens, --context-size and --model-batch-size: the
    model and held-out text a command reads to gather feature statistics (`what` finishes
    the --tokens help: "tokens to read for ...")."""
    add_backend_argument(parser)
    parser.add_argument(
        "--model", default=None,
        help="model to run (default: the model named in the SAE's metadata)",
    )
    parser.add_argument(
        "--dataset", default=None,
        help="text to read (path or Hub name; default: the bundled corpus's held-out works)",
    )
    parser.add_argument(
        "--tokens", type=positive_int, default=tokens,
        help=f"tokens to read for {what} (default %(default)s)",
    )
    parser.add_argument(
        "--context-size", type=positive_int, default=None,
        help="tokens per sequence (default: the SAE's training context size, else 128)",
    )
    add_model_batch_size(parser, default=16)


#: Folders `saekit eval` writes beside the SAEs' own: one per evaluation type.
_RESULT_FOLDERS = {"core", "sparse_probing", "scr", "tpp", "absorption", "absorption_first_letter"}


def result_names(targets: list[str]) -> list[str]:
    """A distinct, file-system-safe folder name per target."""
    names: list[str] = []
    for target in targets:
        base = re.sub(r"[^\w.-]+", "__", target.strip("/")).strip("_") or "sae"
        if base in _RESULT_FOLDERS:  # the evaluations' own folders sit beside the SAEs'
            base = f"{base}_sae"
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def write_results(out: Path, results: dict[str, EvalMetrics], targets: dict[str, str]) -> Path:
    """Write the per-SAE folders and metrics.csv under `out`; returns the CSV path."""
    from safetensors.torch import save_file

    from saekit.evals.plots import plot_feature_density

    out.mkdir(parents=True, exist_ok=True)
    for name, metrics in results.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        record: dict[str, Any] = {"target": targets[name], **json_safe(metrics.to_dict())}
        (folder / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
        stats = {
            "firing_frequency": metrics.firing_frequency.float().contiguous(),
            "mean_activation_when_firing": metrics.mean_activation_when_firing.float(),
            "max_activation": metrics.max_activation.float().contiguous(),
        }
        save_file(stats, str(folder / "feature_stats.safetensors"))
        plot_feature_density(metrics.firing_frequency, folder / "feature_density.png", title=name)
    csv_path = out / "metrics.csv"
    columns = ["sae", "target", *METRIC_NAMES, "n_tokens"]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for name, metrics in results.items():
            writer.writerow({"sae": name, "target": targets[name], **metrics.to_dict()})
    return csv_path


def run(args: argparse.Namespace) -> int:
    from saekit.evals.suite import parse_suite, save_suite_results, suite_table
    from saekit.preflight import check_device, check_local_dataset, check_out_folder

    suite = parse_suite(args.suite)
    check_device(args.device)
    check_local_dataset(args.dataset)
    check_out_folder(args.out)
    configs = downstream_configs(args, suite)
    targets: list[str] = args.targets
    saes: list[Any] = []
    for target in targets:  # a CLT or crosscoder is refused before any model loads
        saes.append(load_target(target, args.device))
        check_one_site(saes[-1], "saekit eval takes SAEs that read one hook", target,
                       command_line=True)
    names = result_names(targets)
    # SAEs of one model share its forward passes; group them by the model they need.
    groups: dict[str | None, list[int]] = {}
    for i, sae in enumerate(saes):
        groups.setdefault(args.model or sae.cfg.metadata.model_name, []).append(i)
    found: list[Any] = [None] * len(saes)
    for model_name, members in groups.items():
        group = [saes[i] for i in members]
        backend = resolve_model(group, args.model, args.backend)
        logger.info("evaluating %d SAE(s) on %s: %s", len(group), model_name, ", ".join(suite))
        per_sae = evaluate_many(
            group,
            backend,
            args.dataset,
            args.tokens,
            context_size=args.context_size,
            batch_size=args.model_batch_size,
            downstream=not args.no_downstream,
            split=args.split,
            suite=suite,
            configs=configs,
        )
        for i, result in zip(members, per_sae, strict=True):
            found[i] = result
    out = Path(args.out)
    if "core" in suite:
        ordered = {name: result.metrics for name, result in zip(names, found, strict=True)}
        csv_path = write_results(out, ordered, dict(zip(names, targets, strict=True)))
        for (name, m), target in zip(ordered.items(), targets, strict=True):
            print(f"\n{target}: held-out metrics on {m.n_tokens:,} tokens ({out / name})")
            print(format_metrics(m.to_dict()))
        print(f"\nwrote {csv_path} and one folder per SAE under {out}")
    per_eval = [result.results for result in found]
    save_suite_results(out, saes, names, per_eval)
    print(f"\n{suite_table(names, per_eval)}")
    print(f"\nwrote SAEBench result files (<evaluation>/<sae>_eval_results.json) and one PNG "
          f"per evaluation under {out}")
    return 0


def downstream_configs(args: argparse.Namespace, suite: list[str]) -> dict[str, Any]:
    """The downstream evaluations' configs, from the probing-dataset flags (the datasets are
    read and checked here, before any model runs)."""
    from saekit.evals.probe_data import resolve_probe_datasets
    from saekit.evals.suite import PROBING, probing_configs

    labels = [c for flag in args.label_column or [] for c in flag.split(",") if c]
    configs = probing_configs(suite, args.probe_dataset, args.text_column, labels or None)
    if args.probe_dataset and not any(name in PROBING for name in suite):
        raise ValueError(
            "--probe-dataset is read by sparse_probing, scr and tpp; add one of them to --suite"
        )
    if args.probe_dataset:
        resolve_probe_datasets(args.probe_dataset, args.text_column, labels or None)
    return configs


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate SAEs on held-out text (CE/KL, explained variance, L0, dead latents)",
        description="Compute every standard SAE metric on held-out text. SAEs of the same "
        "model are evaluated in one pass over the data.",
    )
    parser.add_argument(
        "targets",
        nargs="+",
        metavar="TARGET",
        help="a saved SAE folder, RELEASE/SAE_ID from the registry, or a Hub repo id",
    )
    add_backend_argument(parser)
    parser.add_argument(
        "--model",
        help="the model the SAEs read (name, Hub id, folder, or 'bundled'); default: the "
        "model named in each SAE's metadata",
    )
    parser.add_argument(
        "--dataset",
        help="held-out text (file, folder or Hub dataset); default: the bundled corpus's "
        "held-out works. Never the SAE's training data",
    )
    parser.add_argument(
        "--tokens",
        type=positive_int,
        default=DEFAULT_EVAL_TOKENS,
        help=f"tokens to evaluate on (default {DEFAULT_EVAL_TOKENS})",
    )
    parser.add_argument("--out", default="eval_results", help="output folder (default %(default)s)")
    parser.add_argument(
        "--context-size", type=positive_int,
        help="tokens per sequence; default: the SAE's, else 128",
    )
    add_model_batch_size(parser, default=8)
    parser.add_argument(
        "--split", default=None,
        help="dataset split to read; default: its test, then validation split, else the "
        "documents the SAE's training run held out when --dataset is its training data, "
        "else all of it",
    )
    parser.add_argument("--device", default="cpu", help="device for the SAEs and the model")
    parser.add_argument(
        "--no-downstream",
        action="store_true",
        help="skip the CE/KL figures (no model runs with the SAE spliced in)",
    )
    parser.add_argument(
        "--suite", default="core",
        help="evaluations to run, comma-separated: core (today's metrics and SAEBench's core "
        "statistics), sparse_probing, scr, tpp, absorption, or all (default %(default)s)",
    )
    parser.add_argument(
        "--probe-dataset", action="append", metavar="DATASET",
        help="for sparse_probing, scr and tpp: a built-in task (author, genre, folio, "
        "author_form, genre_period) or a CSV / JSONL file or Hugging Face dataset with a text "
        "column and one or two label columns; repeat for several (default: each "
        "evaluation's built-in tasks)",
    )
    parser.add_argument(
        "--text-column", help="the --probe-dataset's text column (default: found by name)",
    )
    parser.add_argument(
        "--label-column", action="append", metavar="COLUMN",
        help="the --probe-dataset's label column; give two (repeated or comma-separated) "
        "for scr and tpp's two attributes",
    )
    parser.set_defaults(func=run)
