"""saekit's bundled demo language model: a small GPT-2 trained on Shakespeare and Milton.

The weights, config and tokenizer ship inside the package (``saekit/assets/bundled_model/``),
so everything here works offline. The same weights load into two backends:

* ``load_bundled_hf`` gives a ``transformers.GPT2LMHeadModel``;
* ``load_bundled_hooked_transformer`` gives a ``transformer_lens.HookedTransformer`` whose
  weights are converted from the HF model *without* LayerNorm folding or weight centring, so
  its logits and hook values match the HF model's (up to float rounding).

See the model card (``README.md`` in the model folder) for how it was trained, and
``scripts/train_bundled_model.py`` for the training script.
"""

from __future__ import annotations

import warnings
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

__all__ = [
    "BUNDLED_MODEL_DIR",
    "load_bundled_hf",
    "load_bundled_hooked_transformer",
    "load_bundled_tokenizer",
]

# Resolved through importlib.resources so it points inside the installed package, wherever that is.
BUNDLED_MODEL_DIR: Path = Path(str(resources.files("saekit.assets").joinpath("bundled_model")))

MODEL_NAME = "saekit-bundled-gpt2"


def _check_dir(model_dir: Path) -> Path:
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"no bundled model at {model_dir} (config.json missing); "
            "was saekit installed without its package data?"
        )
    return model_dir


def load_bundled_tokenizer(model_dir: Path | str | None = None) -> PreTrainedTokenizerFast:
    """The bundled byte-level BPE tokenizer; ``<|endoftext|>`` is its BOS, EOS, pad and unk.

    Like GPT-2's, it does not add BOS by itself: callers (or TransformerLens' ``to_tokens``)
    prepend it.
    """
    from transformers import AutoTokenizer

    path = _check_dir(Path(model_dir) if model_dir is not None else BUNDLED_MODEL_DIR)
    return AutoTokenizer.from_pretrained(path)


def load_bundled_hf(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    model_dir: Path | str | None = None,
) -> GPT2LMHeadModel:
    """The bundled model as a ``GPT2LMHeadModel``, in eval mode, on ``device`` in ``dtype``."""
    from transformers import GPT2LMHeadModel

    path = _check_dir(Path(model_dir) if model_dir is not None else BUNDLED_MODEL_DIR)
    # Load in float32 and convert afterwards: the dtype keyword changed name across
    # transformers versions (torch_dtype -> dtype), .to() has not.
    # "gelu_pytorch_tanh" is the same tanh-approximated GELU as the saved "gelu_new", computed
    # in one fused kernel instead of five element-wise steps (about a fifth of forward time).
    model = GPT2LMHeadModel.from_pretrained(path, activation_function="gelu_pytorch_tanh")
    model.to(device=device, dtype=dtype)
    model.eval()
    return model


def load_bundled_hooked_transformer(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    model_dir: Path | str | None = None,
) -> HookedTransformer:
    """The bundled model as a ``HookedTransformer`` with the bundled tokenizer attached.

    The config is written by hand from the HF config (TransformerLens' pretrained-model table
    does not know this model), and the weights are converted with TransformerLens' own GPT-2
    converter. No LayerNorm folding, no centring and no value-bias folding, so every hook
    (``blocks.{i}.hook_resid_pre``, ``ln1.hook_normalized``, ...) holds the same values as the
    matching place in the HF model.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    path = _check_dir(Path(model_dir) if model_dir is not None else BUNDLED_MODEL_DIR)
    hf_model = load_bundled_hf(device="cpu", dtype=torch.float32, model_dir=path)
    hf_cfg = hf_model.config
    tokenizer = load_bundled_tokenizer(path)

    if hf_cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"unexpected activation {hf_cfg.activation_function!r} in {path}")
    cfg = HookedTransformerConfig(
        model_name=MODEL_NAME,
        original_architecture="GPT2LMHeadModel",
        n_layers=hf_cfg.n_layer,
        d_model=hf_cfg.n_embd,
        n_heads=hf_cfg.n_head,
        d_head=hf_cfg.n_embd // hf_cfg.n_head,
        d_mlp=hf_cfg.n_inner or 4 * hf_cfg.n_embd,
        d_vocab=hf_cfg.vocab_size,
        n_ctx=hf_cfg.n_positions,
        act_fn="gelu_new",
        normalization_type="LN",
        eps=hf_cfg.layer_norm_epsilon,
        positional_embedding_type="standard",
        default_prepend_bos=True,
        tokenizer_prepends_bos=False,
        # Weights come from the checkpoint; random initialisation would be wasted work.
        init_weights=False,
        device=str(device),
        dtype=dtype,
    )
    with warnings.catch_warnings():
        # transformer-lens 3.x flags HookedTransformer as deprecated; saekit uses it on purpose.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # TransformerLens re-reads the tokenizer from its name_or_path, which here is the local
        # model folder, so this stays offline.
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)

    state_dict = convert_gpt2_weights(hf_model, cfg)
    # GPT-2 has no unembedding bias; TransformerLens' unembed always carries one.
    state_dict.setdefault("unembed.b_U", torch.zeros(cfg.d_vocab))
    # The causal mask and its fill value are persistent buffers, built by the model itself.
    buffers = {name for name, _ in model.named_buffers()}
    missing = set(model.state_dict()) - set(state_dict) - buffers
    if missing:
        raise RuntimeError(f"weight conversion left out {sorted(missing)}")
    full = model.state_dict()
    full.update({k: v.detach().clone() for k, v in state_dict.items()})
    # Plain load_state_dict (not load_and_process_state_dict): that one folds and centres.
    model.load_state_dict(full, strict=True)
    # HookedTransformer.to takes one device or dtype at a time and keeps cfg in step.
    model.to(torch.device(device), print_details=False)
    model.to(dtype, print_details=False)
    model.eval()
    return model
