"""`saekit pretrained list|show`: browse the registry of published SAE releases."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from saekit.io.releases import Release, find_releases, get_release


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


def list_text(releases: Sequence[Release]) -> str:
    rows = [(r.name, r.model, r.layout, len(r), r.repo_id) for r in releases]
    return table(("release", "model", "layout", "saes", "hub repo"), rows)


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
    releases = find_releases(model=args.model, search=args.search)
    if not releases:
        print("no release matches; try a shorter --search or --model")
        return 1
    print(list_text(releases))
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
    lister.set_defaults(func=run_list)
    shower = actions.add_parser("show", help="show one release's SAEs as a table")
    shower.add_argument("release", help="release name or alias (see `saekit pretrained list`)")
    shower.set_defaults(func=run_show)
