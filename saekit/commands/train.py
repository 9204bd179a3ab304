"""`saekit train`: train an SAE from a config file and/or one flag per config field."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saekit.training.config import (
    EXTRA_KEYS,
    RUN_CONFIG_FILE,
    SECTIONS,
    SETTING_ALIASES,
    ConfigError,
    TrainConfig,
)
from saekit.training.fields import coerce, field_docs, read_config_file

if TYPE_CHECKING:
    from saekit.analysis.crosscoder_norms import CrosscoderNorms

log = logging.getLogger(__name__)


#: Other spellings of a setting's flag (with SETTING_ALIASES, the old and SAELens names).
FLAG_ALIASES: dict[str, tuple[str, ...]] = {
    "run.imports": ("--import",),
    **{
        setting: tuple("--" + alias.replace("_", "-") for alias in aliases)
        for setting, aliases in SETTING_ALIASES.items()
    },
}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an SAE (with no arguments: the demo SAE on the bundled model)",
        description=(
            "Train a sparse autoencoder. Settings come from the defaults, then --config FILE "
            "(YAML or JSON with sections sae, data, training, run), then the flags below. "
            "With no arguments it trains the demo: a topk SAE (AuxK, 16x expansion) on the "
            "bundled model's middle residual stream, on the bundled corpus."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="FILE",
        help="YAML or JSON training config: saekit's sections, or a SAELens runner config "
        "(LanguageModelSAERunnerConfig), translated field by field",
    )
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} ({cls.__doc__})")
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kwargs: dict[str, Any] = {
                "dest": f"{section}.{f.name}",
                "default": argparse.SUPPRESS,
                "help": f"{docs.get(f.name, '')} (default: {getattr(defaults, f.name)!r})",
            }
            if hints[f.name] in (bool, bool | None):
                kwargs["action"] = argparse.BooleanOptionalAction
            elif _is_list(hints[f.name]):
                kwargs["nargs"] = "+"
                kwargs["metavar"] = f.name.upper()
            else:
                kwargs["metavar"] = f.name.upper()
            if f.name == "architecture":
                from saekit.saes import list_architectures

                kwargs["help"] += f"; registered: {', '.join(list_architectures())}"
            group.add_argument(flag, *FLAG_ALIASES.get(kwargs["dest"], ()), **kwargs)
    group = parser.add_argument_group(
        "several SAEs from one model pass (also --hook-name with several names or a glob "
        "pattern, --layers and --seeds; docs/training.md)"
    )
    group.add_argument(
        "--sweep", nargs="+", metavar="FIELD=V1,V2", default=argparse.SUPPRESS,
        help="train one SAE per combination of these values of sae or training fields, "
        "e.g. --sweep k=32,64,128 expansion_factor=8,16 (crossed with the hooks and seeds; "
        "every SAE trains from the same model pass, each in its own sub-folder of --out)",
    )
    parser.set_defaults(func=run_train)


def _is_list(hint: Any) -> bool:
    args = typing.get_args(hint)
    return typing.get_origin(hint) is list or any(typing.get_origin(a) is list for a in args)


def read_train_file(path: str | Path) -> dict[str, Any]:
    """A --config file's sections; a SAELens runner config (LanguageModelSAERunnerConfig as
    JSON or YAML) is translated to them first."""
    from saekit.training.saelens_config import from_saelens_config, is_saelens_config

    data = read_config_file(path)
    return from_saelens_config(data) if is_saelens_config(data) else data


def given_settings(args: argparse.Namespace) -> set[str]:
    """The settings ("training.lr") named by a flag or in the --config file."""
    given = {key for key in vars(args) if "." in key}
    if getattr(args, "config", None):
        for section, values in read_train_file(args.config).items():
            if section in SECTIONS and isinstance(values, dict):
                given.update(f"{section}.{name}" for name in values)
    return given


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, overridden by --config, overridden by flags; every problem reported at once."""
    data: dict[str, dict[str, Any]] = {}
    resume = getattr(args, "run.resume", None)
    if resume is not None and (Path(resume) / RUN_CONFIG_FILE).is_file():
        # A resumed run's settings start from its own; the flags given are checked against
        # them (and applied where they may change) by `train`.
        data = TrainConfig.load(Path(resume) / RUN_CONFIG_FILE).to_dict()
    if getattr(args, "config", None):
        for section, values in read_train_file(args.config).items():
            if section in EXTRA_KEYS or not isinstance(values, dict | None):
                data[section] = values  # a sweep or saes list (or a mistake from_dict names)
            else:
                data.setdefault(section, {}).update(dict(values or {}))
    if getattr(args, "sweep", None):
        data["sweep"] = list(args.sweep)  # FIELD=V1,V2 items, read by TrainConfig
    problems: list[str] = []
    for key, value in vars(args).items():
        if "." not in key:
            continue
        section, name = key.split(".", 1)
        hint = typing.get_type_hints(SECTIONS[section])[name]
        try:
            value = coerce(value, hint)
        except (TypeError, ValueError):
            problems.append(f"--{name.replace('_', '-')}: cannot read {value!r}")
            continue
        data.setdefault(section, {})[name] = value
    try:
        cfg = TrainConfig.from_dict(data)
    except ConfigError as err:
        raise ConfigError(problems + err.problems) from None
    if problems:
        raise ConfigError(problems)
    return cfg


def run_train(args: argparse.Namespace) -> int:
    from saekit.training import TrainingDiverged
    from saekit.training.entry import train

    cfg = config_from_args(args)
    if not cfg.run.progress:  # --no-progress after `train`, or progress: false in --config
        from saekit.progress import set_progress

        set_progress(False)  # the whole run: norm estimate, evaluation, statistics, dashboard
    try:
        outcome = train(cfg, given=given_settings(args))
    except TrainingDiverged as err:
        log.error("saekit: error: %s", err)
        return 1
    if outcome.interrupted is not None:
        name = signal.Signals(outcome.interrupted).name
        log.warning(
            "%s: stopped and checkpointed; continue with: saekit train --resume %s",
            name, outcome.run_dir,
        )
        return 128 + outcome.interrupted
    if outcome.is_main:
        from saekit.training.many import ManyOutcome

        if isinstance(outcome, ManyOutcome):
            print_many_report(outcome)
        elif outcome.sae.multi_site:
            print_multisite_report(outcome)
        else:
            print_report(outcome)
    return 0


def print_multisite_report(outcome: Any) -> None:
    """Where the clt or crosscoder is and its held-out figures (`format_multisite_metrics`)."""
    kind = "cross-layer transcoder" if outcome.sae.is_transcoder else "crosscoder"
    print(f"\nsaved the {kind} to {outcome.run_dir}  (load it: "
          f"SAE.load({str(outcome.run_dir)!r}))")
    heldout = outcome.heldout
    if heldout is not None and outcome.metrics:
        print(f"held-out metrics on {heldout.summary()}:")
    elif heldout is None:
        print("no held-out evaluation (eval_tokens is 0)")
    norms = None
    if outcome.metrics:
        from saekit.analysis.crosscoder_norms import crosscoder_norms

        norms = crosscoder_norms(outcome.sae)
    print(format_multisite_metrics(outcome.metrics, norms))


#: Bins of the relative-norm histogram in the training report: one line each (the class
#: counts above it already single out the exclusive latents at either end).
REPORT_BINS = 5


def format_multisite_metrics(
    metrics: dict[str, Any], norms: CrosscoderNorms | None = None
) -> str:
    """A clt's or crosscoder's metrics.json as text: a row per layer (FVU, L0, dead latents)
    and the replacement model's CE/KL scores, or a row per site (explained variance, MSE),
    the shared latents' L0 and dead fraction, and a two-site crosscoder's latent classes.

    The classes read with the sites' names ("gpt2 only") and come with a histogram of the
    relative decoder norms (`relative_norm_summary`) when `norms`, the saved crosscoder's
    `CrosscoderNorms`, is given; without it they keep their metrics.json names."""
    from saekit.training.crosslayer_run import CLASSES_KEY

    def show(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines: list[str] = []
    if "layers" in metrics:
        rows = [("layer", "reads", "writes", "FVU", "L0", "dead")]
        for i, layer in enumerate(metrics["layers"]):
            fvu = metrics["fvu"][i]
            rows.append((
                str(i), layer.get("hook_name", "-"), layer.get("hook_name_out", "-"),
                show(fvu, ".4f"), show(layer.get("l0"), ".1f"),
                show(100 * layer["dead_fraction"] if layer.get("dead_fraction") is not None
                     else None, ".1f") + "%",
            ))
        lines.extend(_table(rows))
        if metrics.get("ce_loss_with_sae") is not None:
            lines.append(
                "  replacement model, every MLP output from the CLT: CE "
                f"{show(metrics['ce_loss_with_sae'], '.4f')} (clean "
                f"{show(metrics.get('ce_loss_without_sae'), '.4f')}, MLP outputs zeroed "
                f"{show(metrics.get('ce_loss_with_ablation'), '.4f')}); ce_loss_score "
                f"{show(metrics.get('ce_loss_score'), '.4f')}, kl_div_score "
                f"{show(metrics.get('kl_div_score'), '.4f')}"
            )
    elif "sites" in metrics:
        rows = [("site", "reads", "explained variance", "mse")]
        n_sites = len(metrics["sites"])
        for i, site in enumerate(metrics["sites"]):
            rows.append((
                "ab"[i] if n_sites == 2 else str(i), site["site"],
                show(site.get("explained_variance"), ".4f"), show(site.get("mse"), ".4g"),
            ))
        lines.extend(_table(rows))
        dead = metrics.get("dead_fraction")
        lines.append(
            f"  L0 {show(metrics.get('l0'), '.2f')} latents per token (shared by every site), "
            f"dead {show(100 * dead if dead is not None else None, '.1f')}%"
        )
    classes = metrics.get(CLASSES_KEY)
    if classes and norms is not None and norms.n_sites == 2:
        from saekit.commands.report import relative_norm_summary

        lines.append(relative_norm_summary(norms, n_bins=REPORT_BINS, width=30))
    elif classes:
        lines.append(
            "  latents by relative decoder norm ||b|| / (||a|| + ||b||): "
            + ", ".join(f"{name} {count}" for name, count in classes.items())
        )
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def print_many_report(outcome: Any) -> None:
    """Where the SAEs of a run of several are, and one row per SAE of held-out figures."""
    from saekit.training.many import SUMMARY_FILE, format_summary

    print(f"\ntrained {len(outcome.runs)} SAEs in {outcome.run_dir} (one sub-folder each; load "
          f"one with SAE.load({str(outcome.run_dir / outcome.plans[0].name)!r}))")
    if outcome.heldout is not None:
        print(f"held-out metrics on {outcome.heldout.summary()}:")
    else:
        print("no held-out evaluation (eval_tokens is 0)")
    print(format_summary(outcome.summary()))
    print(f"\nthe same table: {outcome.run_dir / SUMMARY_FILE}")


def print_report(outcome: Any) -> None:
    """Where the SAE is and how it scores on held-out text; then, unless the run's `report`
    setting is off, five latents with the held-out text that activates them most and a
    dashboard of every latent in the run folder. Everything uses the run's own model,
    text framing and held-out text."""
    from saekit.analysis.dashboard import write_dashboard
    from saekit.commands.dashboard import hook_description
    from saekit.commands.report import format_metrics, heldout_statistics, latent_report

    print(f"\nsaved the SAE to {outcome.run_dir}  (load it: SAE.load({str(outcome.run_dir)!r}))")
    started = outcome.sae.cfg.metadata.extra.get("init_from")
    if isinstance(started, dict):
        print(
            f"fine-tuned from {started.get('identity') or started.get('source')} "
            f"(weights sha256 {str(started.get('weights_sha256'))[:16]}...)"
        )
    heldout = outcome.heldout
    if outcome.metrics:
        print(f"held-out metrics on {heldout.summary()}:" if heldout else "held-out metrics:")
        print(format_metrics(outcome.metrics))
    elif heldout is None:
        print("no held-out evaluation (eval_tokens is 0)")
    if not outcome.config.run.report or heldout is None:
        return
    stats = heldout_statistics(outcome.sae, outcome.backend, heldout.batches)
    print("\nfive latents and the held-out text that activates them most:")
    print(latent_report(stats, outcome.backend.tokenizer))
    meta = outcome.sae.cfg.metadata
    title = f"{meta.model_name} · {meta.hook_name} · {outcome.sae.cfg.d_sae} latents"
    index = write_dashboard(
        stats, outcome.backend.tokenizer, outcome.run_dir / "dashboard", title=title,
        sae_name=str(outcome.run_dir), model_name=meta.model_name or "",
        hook_name=hook_description(outcome.sae),
    )
    print(f"\ndashboard of every latent: {index}  (open it in a browser)")
