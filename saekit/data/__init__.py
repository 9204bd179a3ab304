"""Data: text datasets to token windows, the activation store, the activation cache."""

from saekit.data.buffer import ShuffledRows
from saekit.data.store import ActivationStore, flatten_activation
from saekit.data.text import find_column, load_text_dataset
from saekit.data.tokens import TokenWindows, keep_mask, special_token_ids

__all__ = [
    "ActivationStore",
    "ShuffledRows",
    "TokenWindows",
    "find_column",
    "flatten_activation",
    "keep_mask",
    "load_text_dataset",
    "special_token_ids",
]
