"""Build saekit's release registry (saekit/io/data/releases.json) from the reference dump.

Usage:
    python scripts/build_release_registry.py [SOURCE.jsonl.gz] [--out saekit/io/data/releases.json]

SOURCE defaults to ../shared/reference/pretrained_releases.jsonl.gz: one JSON object a line,
facts about published SAE releases extracted from the MIT-licensed sae-lens 6.54.12 package
(copyright Joseph Bloom; see LICENSE-THIRD-PARTY). The package only ever reads the JSON file
this script writes; run it again when the source changes, or edit the JSON by hand to add a
release (the format is documented at the top of saekit/io/releases.py).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = ROOT.parent / "shared" / "reference" / "pretrained_releases.jsonl.gz"
DEFAULT_OUT = ROOT / "saekit" / "io" / "data" / "releases.json"

#: The source's layout names -> saekit's (the names users see in `saekit pretrained list`).
LAYOUT_NAMES = {
    "native": "native",
    "gemma_2": "gemma_scope",
    "gemma_2_transcoder": "gemma_scope_transcoder",
    "gemma_3": "gemma_scope_2",
    "llama_scope": "llama_scope",
    "llama_scope_r1_distill": "llama_scope_r1_distill",
    "dictionary_learning_1": "dictionary_learning",
    "sparsify": "sparsify",
}

#: Short names met in docs and tutorials, beyond the automatic "drop the author tag" rule.
EXTRA_ALIASES: dict[str, list[str]] = {}

SAE_FIELDS = (
    ("id", "id"),
    ("path", "path"),
    ("l0", "l0"),
    ("variance_explained", "variance_explained"),
    ("neuronpedia", "neuronpedia_id"),
    ("norm_scaling_factor", "norm_scaling_factor"),
)


def convert_release(row: dict[str, Any]) -> dict[str, Any]:
    layout = LAYOUT_NAMES.get(row["format"], row["format"])
    release: dict[str, Any] = {
        "model": row["model"],
        "repo_id": row["repo_id"],
        "layout": layout,
    }
    if row.get("config_overrides"):
        release["config_overrides"] = row["config_overrides"]
    if row["release"] in EXTRA_ALIASES:
        release["aliases"] = EXTRA_ALIASES[row["release"]]
    saes = []
    for sae in row["saes"]:
        entry = {ours: sae[theirs] for theirs, ours in SAE_FIELDS if sae.get(theirs) is not None}
        entry["id"], entry["path"] = str(entry["id"]), str(entry["path"])  # a few are numbers
        if entry.get("path") == entry["id"]:
            del entry["path"]  # the folder defaults to the id; keeps the file small
        saes.append(entry)
    release["saes"] = saes
    return release


def render(releases: dict[str, dict[str, Any]], source_name: str) -> str:
    """JSON with one SAE a line, so that diffs and hand edits stay readable."""
    lines = [
        "{",
        '  "format_version": 1,',
        '  "attribution": '
        + json.dumps(
            f"Release facts extracted from {source_name}, itself from the registry of the "
            "MIT-licensed sae-lens 6.54.12 package (copyright Joseph Bloom)."
        )
        + ",",
        '  "releases": {',
    ]
    names = list(releases)
    for i, name in enumerate(names):
        release = dict(releases[name])
        saes = release.pop("saes")
        lines.append(f"    {json.dumps(name)}: {{")
        for key, value in release.items():
            lines.append(f"      {json.dumps(key)}: {json.dumps(value)},")
        lines.append('      "saes": [')
        for j, sae in enumerate(saes):
            comma = "," if j < len(saes) - 1 else ""
            lines.append(f"        {json.dumps(sae)}{comma}")
        lines.append("      ]")
        lines.append("    }" + ("," if i < len(names) - 1 else ""))
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    releases: dict[str, dict[str, Any]] = {}
    with gzip.open(args.source, "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                if row["release"] in releases:
                    raise SystemExit(f"release {row['release']!r} appears twice in {args.source}")
                releases[row["release"]] = convert_release(row)
    text = render(dict(sorted(releases.items())), args.source.name)
    json.loads(text)  # the hand-rolled layout must still be valid JSON
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    count = sum(len(r["saes"]) for r in releases.values())
    print(f"wrote {args.out} ({len(releases)} releases, {count} SAEs)")


if __name__ == "__main__":
    main()
