"""Which latents to explain: `0-999`, `3,17,40-49`, `random:200` or `all`."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

_RANDOM = re.compile(r"^random:(\d+)$")
#: More ids than any SAE has latents: a range this long is a typo.
MAX_IDS = 10_000_000
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


@dataclass(frozen=True)
class LatentSelection:
    """A parsed `--latents` spec: `ids` listed, `random` of them drawn, or `all`."""

    ids: tuple[int, ...] = ()
    random: int = 0
    all: bool = False

    def check(self, d_sae: int) -> None:
        """Refuse latent ids the SAE does not have."""
        bad = [i for i in self.ids if i >= d_sae]
        if bad:
            raise ValueError(
                f"--latents names latent {bad[0]}"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                + f", but the SAE has {d_sae} latents, 0 to {d_sae - 1}"
            )

    def choose(self, fire_count: Tensor, min_fires: int, seed: int = 0) -> list[int]:
        """The latent ids, in order; `random:N` draws N (seeded) among the latents that
        fired on at least `min_fires` tokens, or takes all of them if there are fewer."""
        if self.all:
            return list(range(fire_count.shape[0]))
        if self.random:
            live = (fire_count >= min_fires).nonzero().flatten().tolist()
            rng = random.Random(f"latents:{seed}")
            return sorted(rng.sample(live, min(self.random, len(live))))
        return list(self.ids)


def parse_latents(spec: str | Sequence[int] | LatentSelection) -> LatentSelection:
    """A selection from a spec: `all`, `random:N`, ids and inclusive ranges separated by
    commas (`0-99,512`), or a sequence of ids."""
    if isinstance(spec, LatentSelection):
        return spec
    if not isinstance(spec, str):
        ids = [int(i) for i in spec]
        if not ids or min(ids) < 0:
            raise ValueError(f"latents must be a non-empty list of ids >= 0, got {list(spec)}")
        return LatentSelection(ids=tuple(dict.fromkeys(ids)))
    text = spec.strip().lower()
    if text == "all":
        return LatentSelection(all=True)
    match = _RANDOM.match(text)
    if match:
        n = int(match.group(1))
        if n < 1:
            raise ValueError(f"--latents {spec}: random:N needs N >= 1")
        return LatentSelection(random=n)
    ids: list[int] = []
    for part in text.split(","):
        match = _RANGE.match(part.strip())
        if not match:
            raise ValueError(
                f"--latents {spec!r}: {part.strip()!r} is not a latent id or range; use ids "
                "and ranges such as 0-999 or 3,17,40-49, random:N (N random live latents), "
                "or all"
            )
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"--latents {spec!r}: the range {part.strip()} runs backwards")
        if hi - lo >= MAX_IDS:
            raise ValueError(f"--latents {spec!r}: more than {MAX_IDS:,} latents; use all")
        ids.extend(range(lo, hi + 1))
    return LatentSelection(ids=tuple(dict.fromkeys(ids)))
