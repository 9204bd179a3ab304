"""`saekit pretokenize` and `saekit cache` through the console-script entry point."""

from __future__ import annotations

import pytest
import torch

from saekit.cli import main
from saekit.data.cache import CachedActivations
from saekit.data.store import ActivationStore
from saekit.data.text import load_text_dataset
from saekit.models import load_model
from saekit.models.tiny import TINY_TEXTS, tiny_gpt2, tiny_tokenizer

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_gpt2(300).save_pretrained(folder)
    tiny_tokenizer(300).save_pretrained(folder)
    return folder


def test_pretokenize_then_cache(tmp_path, model_dir, capsys) -> None:
    text = tmp_path / "docs.txt"
    text.write_text("\n".join(list(TINY_TEXTS) * 2) + "\n")
    tokens = tmp_path / "tokens"
    assert main(["pretokenize", "--tokenizer", str(model_dir), "--dataset", str(text),
                 "--context-size", "16", "--out", str(tokens)]) == 0
    assert "sequences of 16 tokens" in capsys.readouterr().out
    windows = load_text_dataset(tokens)
    assert windows.column_names == ["input_ids"]
    assert all(len(row) == 16 for row in windows["input_ids"])

    out = tmp_path / "cache"
    argv = ["cache", "--model", str(model_dir), "--hook", HOOK, "--dataset", str(tokens),
            "--context-size", "16", "--tokens", "120", "--shard-tokens", "50",
            "--model-batch-size", "2", "--heldout-tokens", "0", "--out", str(out)]
    assert main(argv) == 0
    reader = CachedActivations(out, batch_size=1, buffer_size=1, shuffle=False)
    assert reader.metadata["model"] == str(model_dir) and reader.n_tokens == 120
    # The same rows as a store reading the text directly (special tokens dropped both ways).
    backend = load_model(model_dir)
    store = ActivationStore(backend, HOOK, text, context_size=16, batch_size=1, buffer_size=1,
                            shuffle=False)
    expected = torch.cat([next(store) for _ in range(120)])
    torch.testing.assert_close(torch.cat(list(reader)), expected)

    assert main(argv) == 0  # finished: rerunning leaves it as it is
    argv[argv.index(HOOK)] = "blocks.0.hook_resid_pre"
    assert main(argv) == 2
    assert "hooks: cache has ['blocks.1.hook_resid_pre']" in capsys.readouterr().err
