"""Where each latent of a crosscoder writes: its decoder norm at every site, kept with the
feature statistics so that the statistics files, the dashboard, the reports and the exports
all read the same numbers.

The raw per-site norms are what is stored; everything else is derived from them by the
functions of `saekit.saes.crosscoder`: the relative norm between two chosen sites a and b
(`relative_norms`), each site's share of the summed norms (`site_shares`, the useful view
with more than two sites), and a class per latent (`classify_latents`: "a_only", "shared",
"b_only", or "neither" for a latent with no decoder at either site) and their counts
(`count_classes`). Changing a, b or the band (`dataclasses.replace(norms, a=1, b=2)`)
re-derives them without touching the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.saes.base import SAE
from saekit.saes.crosscoder import (
    A_ONLY,
    B_ONLY,
    CLASS_ORDER,
    EXCLUSIVE_BAND,
    NEITHER,
    SHARED,
    Crosscoder,
    classify_latents,
    count_classes,
    relative_norms,
    site_names,
    site_shares,
)


@dataclass
class CrosscoderNorms:
    """A crosscoder's decoder norms per latent and site, and the two sites compared."""

    site_norms: Tensor
    """[d_sae, n_sites] float32: ||W_dec[i, s]|| for latent i at site s."""
    site_names: list[str]
    """A name per site (a model name for model diffing, a hook name for layers)."""
    a: int = 0
    """The site whose exclusive latents are "a_only" (relative norm near 0)."""
    b: int = 1
    """The site whose exclusive latents are "b_only" (relative norm near 1)."""
    band: float = EXCLUSIVE_BAND
    """Relative norms below `band` are a-only, above 1 - band b-only."""

    def __post_init__(self) -> None:
        if self.site_norms.ndim != 2 or self.site_norms.shape[1] < 2:
            raise ValueError(
                "site_norms must be [d_sae, n_sites] with at least two sites, got "
                f"{tuple(self.site_norms.shape)}"
            )
        self.site_norms = self.site_norms.detach().float().cpu()
        if len(self.site_names) != self.n_sites:
            raise ValueError(
                f"{len(self.site_names)} site names for {self.n_sites} sites; give one per site"
            )
        relative_norms(self.site_norms[:0], self.a, self.b)  # checks a and b
        classify_latents(torch.zeros(0), self.band)  # checks the band

    @classmethod
    def of(
        cls, crosscoder: SAE, a: int = 0, b: int = 1, band: float = EXCLUSIVE_BAND
    ) -> CrosscoderNorms:
        """The norms of `crosscoder`'s decoders, its sites named from its metadata."""
        if not isinstance(crosscoder, Crosscoder):
            raise ValueError(
                f"decoder norms per site are for crosscoders, got a "
                f"{crosscoder.cfg.architecture!r}"
            )
        return cls(crosscoder.site_decoder_norms(), site_names(crosscoder), a, b, band)

    @property
    def n_sites(self) -> int:
        return int(self.site_norms.shape[1])

    @property
    def d_sae(self) -> int:
        return int(self.site_norms.shape[0])

    @property
    def relative(self) -> Tensor:
        """[d_sae] relative decoder norm between sites a and b (NaN: no decoder at either)."""
        return relative_norms(self.site_norms, self.a, self.b)

    @property
    def shares(self) -> Tensor:
        """[d_sae, n_sites] each site's share of the latent's summed decoder norms."""
        return site_shares(self.site_norms)

    @property
    def classes(self) -> list[str]:
        """A class per latent: "a_only", "shared", "b_only" or "neither"."""
        return classify_latents(self.relative, self.band)

    @property
    def class_codes(self) -> Tensor:
        """[d_sae] uint8: each latent's class as its index in `CLASS_ORDER` (the codes a
        dashboard's index stores)."""
        index = {name: code for code, name in enumerate(CLASS_ORDER)}
        return torch.tensor([index[c] for c in self.classes], dtype=torch.uint8)

    def class_labels(self) -> dict[str, str]:
        """How each class reads with the sites' names, e.g. {"a_only": "gpt2 only", ...}."""
        name_a, name_b = self.site_names[self.a], self.site_names[self.b]
        return {
            A_ONLY: f"{name_a} only", SHARED: "shared", B_ONLY: f"{name_b} only",
            NEITHER: "no decoder at either site",
        }

    def counts(self) -> dict[str, int]:
        """How many latents fall in each class, in `CLASS_ORDER` (`count_classes`)."""
        return count_classes(self.classes)


def crosscoder_norms(sae: SAE) -> CrosscoderNorms | None:
    """`CrosscoderNorms.of(sae)` for a crosscoder over two or more sites, None for any
    other SAE."""
    if isinstance(sae, Crosscoder) and sae.n_sites >= 2:
        return CrosscoderNorms.of(sae)
    return None
