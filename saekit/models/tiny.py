"""Tiny random-weight models and a tiny tokenizer, built locally in milliseconds.

For tests, docs and quick experiments that must run offline: nothing is downloaded. The
tokenizer is a byte-level BPE trained on a few sentences; the models are GPT-2 / Llama /
HookedTransformer shapes with random weights (seeded, so results repeat).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

TINY_TEXTS = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Of man's first disobedience, and the fruit of that forbidden tree, whose mortal taste",
    "Brought death into the world, and all our woe, with loss of Eden.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune, or to take arms against a sea of troubles.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
)

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")


def tiny_tokenizer(vocab_size: int = 300) -> Any:
    """A `PreTrainedTokenizerFast` with BOS/EOS/pad tokens, trained on `TINY_TEXTS`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_TEXTS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )


def tiny_gpt2(vocab_size: int = 300, n_layer: int = 2, d_model: int = 32, seed: int = 0) -> Any:
    """A random-weight `GPT2LMHeadModel` (n_positions 128), in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size, n_layer=n_layer, n_embd=d_model, n_head=2, n_positions=128,
        bos_token_id=0, eos_token_id=1,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(vocab_size: int = 300, n_layer: int = 2, d_model: int = 32, seed: int = 0) -> Any:
    """A random-weight `LlamaForCausalLM`, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model,
        num_hidden_layers=n_layer, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_hooked_transformer(
    vocab_size: int = 300, n_layers: int = 2, d_model: int = 32, seed: int = 0,
    tokenizer: Any = None,
) -> Any:
    """A random-weight TransformerLens `HookedTransformer` (2 heads, context 128), with
    `tokenizer` attached as `model.tokenizer` when given."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, n_heads=2, d_head=d_model // 2, d_mlp=2 * d_model,
        d_vocab=vocab_size, n_ctx=128, act_fn="gelu_new", normalization_type="LN", seed=seed,
        model_name="tiny-hooked",
    )
    with warnings.catch_warnings():
        # transformer-lens 3.9 flags HookedTransformer as deprecated; saekit supports it on purpose.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        model = HookedTransformer(cfg, move_to_device=False)
    # Set directly: HookedTransformer.set_tokenizer reloads the tokenizer by name from the Hub.
    model.tokenizer = tokenizer
    return model.eval()
