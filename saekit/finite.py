"""Checks that activations and weights hold only finite numbers.

A NaN or an infinity that slips into training spreads through every weight it touches, and a
saved SAE full of them loads, evaluates to nulls and uploads as if nothing were wrong. These
checks are cheap when everything is finite (one reduction per tensor) and search for the
culprit only when something is not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor


class NonFiniteActivations(ValueError):
    """Activations holding NaN or infinity (or rows so large that their squares overflow);
    the message says where they came from."""


class NonFiniteWeights(ValueError):
    """SAE weights holding NaN or infinity; the message names the tensor and where it was."""


class NonFinite(NamedTuple):
    """Where a tensor first holds a non-finite value, and how many it holds."""

    index: tuple[int, ...]
    """Index of the first non-finite element (row-major order)."""
    value: float
    """That element: nan, inf or -inf."""
    count: int
    """Non-finite elements in the whole tensor."""
    rows: int
    """Rows (entries of the first dimension) holding at least one of them."""

    def describe(self, axes: tuple[str, ...] = ()) -> str:
        """"nan at row 3, column 7 (12 values in 2 rows)", naming the axes given."""
        if axes and len(axes) == len(self.index):
            where = ", ".join(f"{axis} {i}" for axis, i in zip(axes, self.index, strict=True))
        else:
            where = f"index {list(self.index)}"
        values = "value" if self.count == 1 else "values"
        rows = "row" if self.rows == 1 else "rows"
        return f"{self.value} at {where} ({self.count} non-finite {values} in {self.rows} {rows})"


def locate_non_finite(tensor: Tensor) -> NonFinite | None:
    """The first NaN or infinity in `tensor`, or None when every element is finite.

    A sum is NaN or infinite whenever any element is, so the common all-finite case costs
    one reduction; the element search runs only when the sum is not finite (which may also
    mean finite values whose sum overflows; the search then finds nothing)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    # Half-precision sums overflow near 65504; sum those in float32.
    total = tensor.sum(dtype=torch.float32) if tensor.element_size() < 4 else tensor.sum()
    if bool(torch.isfinite(total)):
        return None
    bad = ~torch.isfinite(tensor)
    count = int(bad.sum())
    if count == 0:
        return None
    first = tuple(int(i) for i in bad.nonzero()[0])
    rows = int(bad.reshape(bad.shape[0], -1).any(dim=1).sum()) if bad.ndim else 1
    return NonFinite(first, float(tensor[first]), count, rows)


def non_finite_report(tensors: Mapping[str, Tensor]) -> str | None:
    """"'W_dec' holds inf at index [0, 3] (...)" for every tensor holding NaN or infinity,
    joined by "; "; None when every tensor is finite."""
    problems = []
    for name, tensor in tensors.items():
        found = locate_non_finite(tensor.detach())
        if found is not None:
            problems.append(f"{name!r} holds {found.describe()}")
    return "; ".join(problems) if problems else None


def check_finite_tensors(tensors: Mapping[str, Tensor], where: str, advice: str = "") -> None:
    """Raise NonFiniteWeights naming every tensor of `tensors` that holds NaN or infinity.

    `where` says whose tensors they are ("sae_weights.safetensors in runs/x"); `advice`, when
    given, ends the message."""
    problems = non_finite_report(tensors)
    if problems:
        message = f"non-finite weights in {where}: {problems}"
        raise NonFiniteWeights(message + (f"; {advice}" if advice else ""))
