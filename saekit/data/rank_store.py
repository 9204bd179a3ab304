"""An activation store that reads only this rank's share of the token windows."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from saekit.data.store import ActivationStore


class RankActivationStore(ActivationStore):
    """`ActivationStore` for data-parallel rank `rank` of `world_size`.

    The ranks read the same token windows `model_batch_size * world_size` at a time and
    each runs the model on every world_size-th one, so together they cover the data once and
    no two ranks train on the same tokens. Tokenizing is repeated on every rank (cheap next
    to the forward pass); the model forward is not.
    """

    def __init__(self, *args: Any, rank: int, world_size: int, **kwargs: Any) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.rank, self.world_size = rank, world_size
        super().__init__(*args, **kwargs)

    def _next_chunk(self) -> dict[str, Tensor] | None:
        tokens = self.windows.batch(self.model_batch_size * self.world_size)
        if tokens is None:
            return None
        mine = tokens[self.rank :: self.world_size]  # [<= model_batch_size, context_size]
        return None if mine.shape[0] == 0 else self._forward(mine)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "rank": self.rank, "world_size": self.world_size}
