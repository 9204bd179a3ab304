"""Write a tokenized dataset to disk, so training reads token ids instead of text."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def pretokenize(
    dataset: Any,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    context_size: int = 128,
    text_column: str | None = None,
    prepend_bos: bool = True,
    packing: bool = True,
    max_windows: int | None = None,
    rows_per_write: int = 1024,
    progress: bool | None = None,
) -> int:
    """Tokenize and pack `dataset` into windows of `context_size` tokens and save them with
    `Dataset.save_to_disk` (one `input_ids` column); returns the number of windows.

    The result reads back as a pre-tokenized dataset: its windows are used as they are.
    Packing options are those of `TokenWindows`. `progress` shows a bar of the tokens
    written (None: as `saekit.progress` is set).
    """
    import datasets

    from saekit.data.tokens import TokenWindows
    from saekit.progress import progress_enabled, progress_off

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; pick a new folder")
    windows = TokenWindows(
        dataset, tokenizer, context_size, text_column=text_column, prepend_bos=prepend_bos,
        packing=packing,
    )
    if windows.pretokenized:
        raise ValueError("the dataset is already tokenized (it has a token column)")

    def rows() -> Any:
        # The bar is made here, not captured: datasets hashes this function and its closure.
        from saekit.progress import bar

        total = None if max_windows is None else max_windows * context_size
        with bar(desc="tokenizing", unit="tok", total=total, progress=progress) as shown:
            count = 0
            while max_windows is None or count < max_windows:
                batch = windows.batch(rows_per_write if max_windows is None
                                      else min(rows_per_write, max_windows - count))
                if batch is None:
                    return
                for window in batch.tolist():
                    yield {"input_ids": window}
                count += batch.shape[0]
                shown.update(batch.numel())

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    with progress_off(not progress_enabled(progress)):  # datasets' own bars as well
        result = datasets.Dataset.from_generator(rows, features=features, cache_dir=None)
        result.save_to_disk(str(out))
    logger.debug("wrote %d windows of %d tokens to %s", len(result), context_size, out)
    return len(result)
