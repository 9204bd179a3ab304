"""`saekit pretrained list|show`: browse the registry of published SAE releases."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from saekit.io.releases import (
    Release,
    ReleaseMatch,
    access_note,
    get_release,
    match_releases,
)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table whose columns are as wide as their widest cell."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def list_text(matches: Sequence[ReleaseMatch | Release]) -> str:
    """The releases as a table; a release given with its matching SAEs counts only those, and
    the token column says which releases need a Hugging Face access token (and why)."""
    rows = []
    for match in matches:
        release, saes = (
            (match.release, len(match.saes)) if isinstance(match, ReleaseMatch)
            else (match, len(match))
        )
        count = str(saes) if saes == len(release) else f"{saes}/{len(release)}"
        rows.append((release.name, release.model, release.layout, count,
                     access_note(release) or "", release.repo_id))
    return table(("release", "model", "layout", "saes", "token", "hub repo"), rows)


def show_text(release: Release) -> str:
    head = [
        f"release:  {release.name}",
        f"model:    {release.model}",
        f"hub repo: {release.repo_id}",
        f"layout:   {release.layout}",
    ]
    if release.aliases:
        head.append(f"aliases:  {', '.join(release.aliases)}")
    if release.config_overrides:
        head.append(f"config overrides: {release.config_overrides}")
    saes = release.saes
    show_path = any(s.path != s.id for s in saes)
    headers = ["sae_id"] + (["path"] if show_path else []) + ["l0", "var. expl.", "neuronpedia"]
    show_scale = any(s.norm_scaling_factor is not None for s in saes)
    if show_scale:
        headers.append("norm scale")
    rows = []
    for s in saes:
        row = [s.id] + ([s.path] if show_path else [])
        row += [_number(s.l0), _number(s.variance_explained), s.neuronpedia_id or ""]
        if show_scale:
            row.append(_number(s.norm_scaling_factor))
        rows.append(row)
    usage = (
        "load one with:\n  from saekit import SAE\n"
        f'  sae, cfg_dict, sparsity = SAE.from_pretrained("{release.name}", "{saes[0].id}")'
    )
    return "\n".join(head) + f"\n\n{len(saes)} SAEs\n" + table(headers, rows) + "\n\n" + usage


def run_list(args: argparse.Namespace) -> int:
    matches = match_releases(
        model=args.model, search=args.search, hook=args.hook,
        architecture=args.architecture, width=args.width,
    )
    if not matches:
        print("no release matches; loosen --search, --model, --hook, --architecture or --width")
        return 1
    print(list_text(matches))
    if any(access_note(m.release) for m in matches):
        print(
            "\ntoken: the SAE repo or the model it reads is gated on the Hugging Face Hub; "
            "accept its licence there, then log in (`hf auth login`) or pass token=..."
        )
    return 0


def run_show(args: argparse.Namespace) -> int:
    print(show_text(get_release(args.release)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrained",
        help="list and inspect published SAE releases",
        description="Browse the registry of published SAE releases "
        "(load one with SAE.from_pretrained).",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    lister = actions.add_parser("list", help="list releases as a table")
    lister.add_argument("--model", help="only releases whose model name contains MODEL")
    lister.add_argument("--search", help="only releases whose name, repo or model contains TEXT")
    lister.add_argument(
        "--hook",
        help="only SAEs whose hook contains HOOK (e.g. resid_post, blocks.12.); the saes "
        "column then counts the matching SAEs",
    )
    lister.add_argument(
        "--architecture",
        help="only SAEs of this architecture (jumprelu, topk, transcoder, ...); releases whose "
        "files alone say it (native, dictionary_learning) match when their name does",
    )
    lister.add_argument(
        "--width", help="only SAEs with this many latents: 16384, 16k (x1024) or 2pow14"
    )
    lister.set_defaults(func=run_list)
    shower = actions.add_parser("show", help="show one release's SAEs as a table")
    shower.add_argument("release", help="release name or alias (see `saekit pretrained list`)")
    shower.set_defaults(func=run_show)
