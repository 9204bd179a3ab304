"""The tiny family folders of families.py: vocabularies that fit the models, and each family's
special tokens and BOS behaviour, as saved and reloaded by transformers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from families import FAMILIES, VOCAB_SIZE

#: (BOS token, whether the tokenizer adds it itself) per family; None: no BOS token at all.
BOS = {
    "gpt2": ("<|endoftext|>", False), "gpt_neox": ("<|endoftext|>", False),
    "gpt_neox_sequential": ("<|endoftext|>", False), "gptj": ("<|endoftext|>", False),
    "opt": ("</s>", True), "llama": ("<s>", True), "mistral": ("<s>", True),
    "gemma": ("<bos>", True), "gemma2": ("<bos>", True), "gemma3": ("<bos>", True),
    "phi3": ("<s>", True), "qwen2": None, "qwen3": None, "bert": None,
    "sentence_transformers": None, "t5_encoder": None,
}
assert set(BOS) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_folder_reloads_with_its_special_tokens(
    family_folder: Callable[[str], Path], family: str
) -> None:
    from transformers import AutoConfig, AutoTokenizer

    folder = family_folder(family)
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert config.vocab_size == len(tokenizer) == VOCAB_SIZE
    ids = tokenizer("the harbour lamps").input_ids
    assert max(ids) < VOCAB_SIZE
    if BOS[family] is None:
        assert tokenizer.bos_token is None
    else:
        bos, added = BOS[family]
        assert tokenizer.bos_token == bos
        assert (ids[0] == tokenizer.bos_token_id) is added
        assert config.bos_token_id == tokenizer.bos_token_id
    if family in ("bert", "sentence_transformers"):
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    if family == "t5_encoder":
        assert ids[-1] == tokenizer.eos_token_id
    if family.startswith("qwen"):
        assert tokenizer.eos_token == "<|endoftext|>"
