"""`saekit pretrained list` filters by hook, architecture and width, and says which releases
need an access token; the facts come from the registry's names (checked against known SAEs)."""

from __future__ import annotations

import pytest

from saekit.cli import main
from saekit.io.releases import access_note, get_release, match_releases, parse_width, sae_facts


@pytest.mark.parametrize(
    ("release", "sae_id", "hook", "architecture", "width"),
    [
        ("gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82", "blocks.12.hook_resid_post",
         "jumprelu", 16384),
        ("gpt2-small-res-jb", "blocks.8.hook_resid_pre", "blocks.8.hook_resid_pre", None, None),
        ("qwen-scope-3-8b-base-w64k-l100", "layer7", "blocks.7.hook_resid_post", "topk", 65536),
        ("llama_scope_lxm_8x", "l3m_8x", "blocks.3.hook_mlp_out", "jumprelu", None),
        ("gemma-scope-2-1b-pt-transcoders", "transcoder/layer_13_width_16k_l0_big_affine",
         "blocks.13.ln2.hook_normalized", "jumprelu_skip_transcoder", 16384),
        ("sae_bench_gemma-2-2b_topk_width-2pow14_date-1109", "blocks.12.hook_resid_post__trainer_0",
         "blocks.12.hook_resid_post", "topk", 16384),
    ],
)
def test_facts_read_off_the_registry(release, sae_id, hook, architecture, width) -> None:
    info = get_release(release)
    assert sae_facts(info, info.sae(sae_id)) == (hook, architecture, width)


def test_width_spellings() -> None:
    assert parse_width("16k") == parse_width("16384") == parse_width("2pow14") == 16384
    assert parse_width("1m") == 2**20
    with pytest.raises(ValueError, match="not a number"):
        parse_width("wide")


def test_filters_keep_only_matching_saes() -> None:
    matches = {m.release.name: m for m in match_releases(model="gemma-2-2b", hook="blocks.12.",
                                                         architecture="jumprelu", width="16k")}
    res = matches["gemma-scope-2b-pt-res"]
    assert res.saes and all(s.path.startswith("layer_12/width_16k") for s in res.saes)
    assert "gpt2-small-res-jb" not in matches
    assert not match_releases(search="gpt2-small-res-jb", architecture="jumprelu")


def test_access_notes() -> None:
    assert access_note(get_release("goodfire-llama-3.1-8b-instruct")) == "SAE repo gated"
    assert access_note(get_release("gemma-scope-2b-pt-res")) == "model gated"
    assert access_note(get_release("gpt2-small-res-jb")) is None


def test_list_command_shows_counts_and_tokens(capsys) -> None:
    assert main(["pretrained", "list", "--model", "gemma-2-2b", "--search", "gemma-scope-2b-pt-res",
                 "--width", "16k", "--hook", "blocks.12."]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("gemma-scope-2b-pt-res "))
    assert "/316" in row and "model gated" in row
    assert "hf auth login" in out
    assert main(["pretrained", "list", "--architecture", "no_such_arch"]) == 1
