"""The release registry: data shipped in the package, name resolution, errors for bad names."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from saekit.io import releases
from saekit.io.releases import (
    check_relative_path,
    find_releases,
    get_release,
    register_release,
)

# A copy of the reference dump the registry was built from (facts from the MIT-licensed
# sae-lens package; see LICENSE-THIRD-PARTY and scripts/build_release_registry.py).
REFERENCE = Path(__file__).resolve().parents[1] / "fixtures/reference/pretrained_releases.jsonl.gz"


def test_registry_holds_every_release_and_sae() -> None:
    everything = releases.all_releases()
    assert len(everything) >= 170
    assert sum(len(r) for r in everything.values()) >= 13857
    gpt2 = get_release("gpt2-small-res-jb")
    assert gpt2.repo_id == "jbloom/GPT2-Small-SAEs-Reformatted"
    assert gpt2.layout == "native"
    entry = gpt2.sae("blocks.8.hook_resid_pre")
    assert entry.path == "blocks.8.hook_resid_pre"
    assert entry.neuronpedia_id == "gpt2-small/8-res-jb"


def test_registry_matches_the_reference_dump() -> None:
    rows = [json.loads(line) for line in gzip.open(REFERENCE, "rt")]
    for row in rows:
        release = get_release(row["release"])
        assert (release.model, release.repo_id) == (row["model"], row["repo_id"])
        assert [s.id for s in release.saes] == [str(s["id"]) for s in row["saes"]]
        assert [s.path for s in release.saes] == [str(s["path"]) for s in row["saes"]]
        assert [s.l0 for s in release.saes] == [s.get("l0") for s in row["saes"]]
        scales = [s.norm_scaling_factor for s in release.saes]
        assert scales == [s.get("norm_scaling_factor") for s in row["saes"]]
        assert release.config_overrides == (row["config_overrides"] or None)


def test_registry_file_is_package_data_not_shared() -> None:
    path = Path(releases.__file__).parent / "data" / releases.DATA_FILE
    assert path.is_file()
    assert "sae-lens" in json.loads(path.read_text())["attribution"]


@pytest.mark.parametrize(
    ("short", "full"),
    [("gemma-2b-res", "gemma-2b-res-jb"), ("gpt2-small-res", "gpt2-small-res-jb")],
)
def test_short_names_resolve(short: str, full: str) -> None:
    assert get_release(short).name == full


def test_ambiguous_stems_are_not_aliases() -> None:
    # Several gemma-scope-2-27b-pt-* releases exist; none may claim the bare stem.
    assert releases.resolve_release_name("gemma-scope-2-27b-pt") is None


def test_unknown_release_lists_close_names() -> None:
    with pytest.raises(ValueError, match="closest names: .*gpt2-small-res-jb"):
        get_release("gpt2-smal-res-jb")


def test_unknown_sae_id_lists_close_ids() -> None:
    with pytest.raises(ValueError, match=r"closest ids: blocks\.8\.hook_resid_pre"):
        get_release("gpt2-small-res-jb").sae("blocks.8.hook_resid_pr")


def test_unrelated_sae_id_lists_the_release_ids() -> None:
    with pytest.raises(ValueError, match=r"its ids are: blocks\.0\.hook_resid_post"):
        get_release("gemma-2b-res-jb").sae("zzz")


def test_missing_sae_id_in_a_multi_sae_release_says_which_exist() -> None:
    with pytest.raises(ValueError, match="pass sae_id"):
        get_release("gpt2-small-res-jb").sae(None)


@pytest.mark.parametrize("bad", ["../etc", "a/../../b", "/abs/path", "C:/x", "a\\b"])
def test_escaping_paths_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        check_relative_path(bad, "sae_id")


def test_id_with_dots_is_rejected_before_lookup() -> None:
    with pytest.raises(ValueError, match=r"'\.\.'"):
        get_release("gpt2-small-res-jb").sae("../blocks.8.hook_resid_pre")


def test_find_by_model_and_search() -> None:
    by_model = find_releases(model="gpt2-small")
    assert by_model and all("gpt2-small" in r.model for r in by_model)
    searched = find_releases(search="GEMMA-SCOPE-2B-PT-RES")
    assert {r.name for r in searched} == {
        "gemma-scope-2b-pt-res",
        "gemma-scope-2b-pt-res-canonical",
    }
    assert find_releases(model="no-such-model") == []


def test_register_release_adds_and_refuses_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(releases, "_EXTRA", {})
    data = {
        "model": "tiny",
        "repo_id": "me/tiny-saes",
        "layout": "native",
        "saes": [{"id": "blocks.0.hook_resid_post", "l0": 3.0}],
    }
    added = register_release("tiny-res-me", data)
    assert get_release("tiny-res-me") is added
    assert added.sae(None).path == "blocks.0.hook_resid_post"
    with pytest.raises(ValueError, match="already exists"):
        register_release("tiny-res-me", data)
    with pytest.raises(ValueError, match="already exists"):
        register_release("gpt2-small-res-jb", data)


def test_registry_paths_are_checked() -> None:
    bad = {
        "model": "m",
        "repo_id": "a/b",
        "layout": "native",
        "saes": [{"id": "x", "path": "../y"}],
    }
    release = releases.Release.from_dict("bad", bad)
    with pytest.raises(ValueError, match="'..'"):
        release.sae("x")
