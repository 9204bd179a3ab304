"""Tiny random-weight model folders, one per model family, built offline.

`build_family(family, folder)` writes what `load_model(folder)` reads: `config.json`,
`model.safetensors` and a tokenizer. Each model has 2 layers, d_model 64 and a vocabulary of
`VOCAB_SIZE` tokens; its weights are random (seeded), with every one-dimensional parameter
(norm weights, biases) perturbed away from its initial value, so that a hook mapped to the
wrong side of a norm or a bias shows up as a numerical difference.

Nothing is downloaded, so the tokenizers are built here too. The decoder tokenizers reuse the
first merges of the bundled model's byte-level BPE (`saekit/assets/bundled_model/`) with each
family's own special tokens and BOS behaviour; they mimic the special tokens and whether BOS is
added, not the real segmentation:

- gpt2, gpt_neox, gpt_neox_sequential, gptj: `<|endoftext|>` (id 0) is BOS, EOS and UNK; the
  tokenizer adds nothing, like GPT-2's and Pythia's (callers prepend BOS themselves).
- opt: `<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3; BOS and EOS are both `</s>`, which the tokenizer
  prepends to every text, like OPT's.
- llama, mistral: `<unk>` 0, `<s>` 1, `</s>` 2; the tokenizer prepends BOS `<s>`.
- gemma, gemma2, gemma3: `<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3; the tokenizer prepends
  `<bos>`.
- phi3: `<unk>` 0, `<s>` 1, `</s>` 2, `<|endoftext|>` 3 (EOS and pad); the tokenizer prepends
  BOS `<s>`.
- qwen2, qwen3: no BOS token at all; `<|endoftext|>` (id 0) is EOS and pad, and
  `<|im_start|>` / `<|im_end|>` exist as chat markers, like Qwen's.
- bert, sentence_transformers: a lower-casing WordPiece trained on a slice of the bundled
  corpus, `[PAD]` 0, `[UNK]` 1, `[CLS]` 2, `[SEP]` 3, `[MASK]` 4; texts become
  `[CLS] ... [SEP]`, like BERT's. No BOS.
- t5_encoder: `<pad>` 0, `</s>` 1, `<unk>` 2; `</s>` is appended to every text, like T5's
  SentencePiece tokenizer. No BOS.

The models: `bert` saves a `BertForMaskedLM`; `sentence_transformers` saves a `BertModel` with
the `modules.json` / `1_Pooling` files of a sentence-transformers folder (like
all-MiniLM-L6-v2); `t5_encoder` saves a `T5EncoderModel`; every other family saves its
`*ForCausalLM` (`GPT2LMHeadModel` for gpt2).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

VOCAB_SIZE = 1024
D_MODEL = 64
N_LAYERS = 2
N_HEADS = 4
D_HEAD = 16
D_MLP = 128
N_CTX = 128

DECODER_FAMILIES = (
    "gpt2", "gpt_neox", "gpt_neox_sequential", "gptj", "opt", "llama", "mistral", "qwen2",
    "qwen3", "gemma", "gemma2", "gemma3", "phi3",
)
ENCODER_FAMILIES = ("bert", "sentence_transformers", "t5_encoder")
FAMILIES = DECODER_FAMILIES + ENCODER_FAMILIES

_BUNDLED_TOKENIZER = (
    Path(__file__).resolve().parents[2] / "saekit" / "assets" / "bundled_model" / "tokenizer.json"
)
# In the bundled BPE, id 0 is <|endoftext|>, ids 1-256 the byte alphabet, and id 257 + i the
# result of merge i.
_FIRST_MERGE_ID = 257


# Tokenizers


def _bpe_tokenizer(specials: list[str], post: str | None) -> Any:
    """A byte-level BPE of VOCAB_SIZE tokens: `specials` first, then the bundled BPE's
    alphabet and first merges; `post` is a TemplateProcessing template for one text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    bundled = json.loads(_BUNDLED_TOKENIZER.read_text())["model"]
    by_id = sorted((i, tok) for tok, i in bundled["vocab"].items() if i > 0)
    n_base = VOCAB_SIZE - len(specials)
    base = [tok for _, tok in by_id[:n_base]]
    vocab = {tok: i for i, tok in enumerate([*specials, *base])}
    merges = []
    for merge in bundled["merges"][: n_base + 1 - _FIRST_MERGE_ID]:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        merges.append((left, right))
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in merges)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    if post is not None:
        used = [s for s in specials if s in post]
        tok.post_processor = processors.TemplateProcessing(
            single=post, special_tokens=[(s, vocab[s]) for s in used]
        )
    return tok


def _fast(tok: Any, **special: str | None) -> Any:
    from transformers import PreTrainedTokenizerFast

    given = {k: v for k, v in special.items() if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=N_CTX, **given)


def _gpt2_style() -> Any:
    tok = _bpe_tokenizer(["<|endoftext|>"], None)
    eot = "<|endoftext|>"
    return _fast(tok, bos_token=eot, eos_token=eot, unk_token=eot)


def _opt_style() -> Any:
    tok = _bpe_tokenizer(["<s>", "<pad>", "</s>", "<unk>"], "</s> $A")
    return _fast(tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def _llama_style() -> Any:
    tok = _bpe_tokenizer(["<unk>", "<s>", "</s>"], "<s> $A")
    return _fast(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _gemma_style() -> Any:
    tok = _bpe_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>"], "<bos> $A")
    return _fast(tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def _phi3_style() -> Any:
    tok = _bpe_tokenizer(["<unk>", "<s>", "</s>", "<|endoftext|>"], "<s> $A")
    return _fast(
        tok, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<unk>",
    )


def _qwen_style() -> Any:
    tok = _bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None)
    return _fast(tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _t5_style() -> Any:
    tok = _bpe_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>")
    return _fast(tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


@lru_cache(maxsize=1)
def _wordpiece_json() -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from saekit.assets.corpus import heldout_text

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False
    )
    tok.train_from_iterator(heldout_text(100_000).splitlines(), trainer=trainer)
    return tok.to_str()


def _bert_style() -> Any:
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(_wordpiece_json())
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return _fast(
        tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
        mask_token="[MASK]",
    )


# Models


def _gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=N_CTX, n_ctx=N_CTX, n_embd=D_MODEL, n_layer=N_LAYERS,
        n_head=N_HEADS, bos_token_id=0, eos_token_id=0,
    ))


def _gpt_neox(parallel: bool) -> Callable[[], Any]:
    def build() -> Any:
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        return GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=VOCAB_SIZE, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS, intermediate_size=4 * D_MODEL,
            max_position_embeddings=N_CTX, rotary_pct=0.25, use_parallel_residual=parallel,
            bos_token_id=0, eos_token_id=0,
        ))

    return build


def _gptj() -> Any:
    from transformers import GPTJConfig, GPTJForCausalLM

    return GPTJForCausalLM(GPTJConfig(
        vocab_size=VOCAB_SIZE, n_positions=N_CTX, n_embd=D_MODEL, n_layer=N_LAYERS,
        n_head=N_HEADS, rotary_dim=8, bos_token_id=0, eos_token_id=0,
    ))


def _opt() -> Any:
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(
        vocab_size=VOCAB_SIZE, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, ffn_dim=D_MLP,
        num_attention_heads=N_HEADS, max_position_embeddings=N_CTX, word_embed_proj_dim=D_MODEL,
        do_layer_norm_before=True, pad_token_id=1, bos_token_id=2, eos_token_id=2,
    ))


def _llama_like(kind: str) -> Callable[[], Any]:
    def build() -> Any:
        import transformers

        config_cls, model_cls = {
            "llama": ("LlamaConfig", "LlamaForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        }[kind]
        tokens = (
            {"bos_token_id": None, "eos_token_id": 0, "pad_token_id": 0}
            if kind.startswith("qwen") else {"bos_token_id": 1, "eos_token_id": 2}
        )
        extra: dict[str, Any] = {"head_dim": D_HEAD} if kind == "qwen3" else {}
        if kind == "mistral":
            extra["sliding_window"] = None
        config = getattr(transformers, config_cls)(
            vocab_size=VOCAB_SIZE, hidden_size=D_MODEL, intermediate_size=D_MLP,
            num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=2,
            max_position_embeddings=N_CTX, tie_word_embeddings=False, **tokens, **extra,
        )
        return getattr(transformers, model_cls)(config)

    return build


def _gemma(version: int) -> Callable[[], Any]:
    def build() -> Any:
        import transformers

        config_cls, model_cls = {
            1: ("GemmaConfig", "GemmaForCausalLM"),
            2: ("Gemma2Config", "Gemma2ForCausalLM"),
            3: ("Gemma3TextConfig", "Gemma3ForCausalLM"),
        }[version]
        extra: dict[str, Any] = {}
        if version >= 2:
            # The query scale of the real models (1/sqrt(head_dim)); the sliding window is
            # shorter than the context so local and global layers differ.
            extra.update(query_pre_attn_scalar=D_HEAD, sliding_window=8)
        if version == 3:
            extra["layer_types"] = ["sliding_attention", "full_attention"]
        config = getattr(transformers, config_cls)(
            vocab_size=VOCAB_SIZE, hidden_size=D_MODEL, intermediate_size=D_MLP,
            num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=1,
            head_dim=D_HEAD, max_position_embeddings=N_CTX, hidden_activation="gelu_pytorch_tanh",
            pad_token_id=0, eos_token_id=1, bos_token_id=2, **extra,
        )
        return getattr(transformers, model_cls)(config)

    return build


def _phi3() -> Any:
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(
        vocab_size=VOCAB_SIZE, hidden_size=D_MODEL, intermediate_size=D_MLP,
        num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=N_HEADS,
        max_position_embeddings=N_CTX, original_max_position_embeddings=N_CTX,
        sliding_window=None, bos_token_id=1, eos_token_id=3, pad_token_id=3,
        tie_word_embeddings=False,
    ))


def _bert_config() -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB_SIZE, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, intermediate_size=D_MLP, max_position_embeddings=N_CTX,
        pad_token_id=0,
    )


def _bert() -> Any:
    from transformers import BertForMaskedLM

    return BertForMaskedLM(_bert_config())


def _bert_base() -> Any:
    from transformers import BertModel

    return BertModel(_bert_config())


def _t5_encoder() -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=VOCAB_SIZE, d_model=D_MODEL, d_kv=D_HEAD, d_ff=D_MLP, num_layers=N_LAYERS,
        num_heads=N_HEADS, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


_BUILDERS: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
    "gpt2": (_gpt2, _gpt2_style),
    "gpt_neox": (_gpt_neox(parallel=True), _gpt2_style),
    "gpt_neox_sequential": (_gpt_neox(parallel=False), _gpt2_style),
    "gptj": (_gptj, _gpt2_style),
    "opt": (_opt, _opt_style),
    "llama": (_llama_like("llama"), _llama_style),
    "mistral": (_llama_like("mistral"), _llama_style),
    "qwen2": (_llama_like("qwen2"), _qwen_style),
    "qwen3": (_llama_like("qwen3"), _qwen_style),
    "gemma": (_gemma(1), _gemma_style),
    "gemma2": (_gemma(2), _gemma_style),
    "gemma3": (_gemma(3), _gemma_style),
    "phi3": (_phi3, _phi3_style),
    "bert": (_bert, _bert_style),
    "sentence_transformers": (_bert_base, _bert_style),
    "t5_encoder": (_t5_encoder, _t5_style),
}
assert set(_BUILDERS) == set(FAMILIES)


def build_model(family: str, seed: int = 0) -> Any:
    """The family's tiny model, in eval mode, with seeded random weights."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    model = _BUILDERS[family][0]()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def build_tokenizer(family: str) -> Any:
    """The family's tokenizer (see the module docstring for what each one mimics)."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    return _BUILDERS[family][1]()


def build_family(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Write the family's tiny model and tokenizer to `folder` (created) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_model(family, seed).save_pretrained(folder)
    build_tokenizer(family).save_pretrained(folder)
    if family == "sentence_transformers":
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling",
             "type": "sentence_transformers.models.Pooling"},
        ], indent=2))
        (folder / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": N_CTX, "do_lower_case": False})
        )
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(
            json.dumps({"word_embedding_dimension": D_MODEL, "pooling_mode_mean_tokens": True})
        )
    return folder
