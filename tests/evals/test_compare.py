"""compare(sae_a, sae_b): an SAE against itself (1.0, all matched), against a permuted copy
(the permutation recovered), against a wider SAE built by splitting known rows (those rows,
and only those, found split), and a duplicate that is not a split."""

from __future__ import annotations

import pytest
import torch
from sae_factory import random_sae

from saekit import SAE
from saekit.evals.compare import compare

D = 32


def orthonormal(n: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(D, n, generator=torch.Generator().manual_seed(seed)))
    return q.T  # [n, D]


def sae_with_decoder(rows: torch.Tensor) -> SAE:
    sae = SAE.create("topk", D, rows.shape[0], k=2)
    with torch.no_grad():
        sae.W_dec.copy_(rows)
    return sae


def test_an_sae_against_itself_matches_everything_at_one() -> None:
    sae = random_sae("standard", d_in=D, d_sae=48)
    result = compare(sae, sae)
    assert result.mean_max_cosine_a == pytest.approx(1.0, abs=1e-5)
    assert result.mean_max_cosine_b == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(result.matched_a, torch.arange(48))
    assert torch.equal(result.matched_b, torch.arange(48))
    assert result.mean_matched_cosine == pytest.approx(1.0, abs=1e-5)
    assert result.shared_fraction == 1.0 and result.splits == []


def test_a_permuted_and_rescaled_copy_is_matched_back() -> None:
    sae = random_sae("topk", d_in=D, d_sae=40, k=4)
    permutation = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    scales = torch.rand(40, 1, generator=torch.Generator().manual_seed(2)) + 0.5
    copy = sae_with_decoder(sae.W_dec.detach()[permutation] * scales)
    result = compare(sae, copy)
    # Row j of the copy is row permutation[j] of the original.
    assert torch.equal(permutation[result.matched_b], result.matched_a)
    assert result.matched_cosines.min().item() == pytest.approx(1.0, abs=1e-5)
    assert result.to_dict()["matched_pairs"] == 40


def test_a_wider_sae_built_by_splitting_known_rows() -> None:
    basis = orthonormal(11)
    parents, offsets = basis[:8], basis[8:]  # offsets are orthogonal to every parent
    split = [0, 3, 5]
    children = []
    for i, offset in zip(split, offsets, strict=True):
        children += [parents[i] + 0.75 * offset, parents[i] - 0.75 * offset]
    kept = [i for i in range(8) if i not in split]
    wide_rows = torch.cat([parents[kept], torch.stack(children)])  # 5 + 6 = 11 rows
    result = compare(sae_with_decoder(parents), sae_with_decoder(wide_rows))

    child_cosine = 1 / (1 + 0.75**2) ** 0.5  # 0.8
    assert [s.latent for s in result.splits] == split
    for n, s in enumerate(result.splits):
        assert sorted(s.parts) == [5 + 2 * n, 6 + 2 * n]
        assert s.cosines == pytest.approx([child_cosine] * 2, abs=1e-5)
        assert s.combined_cosine == pytest.approx(1.0, abs=1e-5)
    assert result.mean_max_cosine_a == pytest.approx((5 + 3 * child_cosine) / 8, abs=1e-5)
    assert result.mean_max_cosine_b == pytest.approx((5 + 6 * child_cosine) / 11, abs=1e-5)
    # Eight pairs: the five kept rows at 1 and one child of each split row at 0.8.
    assert sorted(result.matched_cosines.tolist()) == pytest.approx(
        [child_cosine] * 3 + [1.0] * 5, abs=1e-5
    )
    # Above the children's cosine, nothing is split.
    assert compare(parents, wide_rows, split_threshold=0.9).splits == []


def test_a_duplicated_row_is_not_a_split() -> None:
    rows = orthonormal(6)
    doubled = torch.cat([rows, rows[:1] * 2.0])
    assert compare(rows, doubled).splits == []
    assert compare(rows, doubled).mean_max_cosine_b == pytest.approx(1.0, abs=1e-5)


def test_bad_inputs_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="sae_a writes d=32, sae_b d=16"):
        compare(orthonormal(4), torch.randn(4, 16))
    with pytest.raises(ValueError, match="split_threshold is a cosine"):
        compare(orthonormal(4), orthonormal(4), split_threshold=1.5)
    with pytest.raises(ValueError, match=r"sae_b must be an SAE or a \[n, d\] tensor"):
        compare(orthonormal(4), torch.randn(32))
