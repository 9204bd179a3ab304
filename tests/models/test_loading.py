"""`load_model` on folders of every kind, hook names, hook-name errors and `saekit hooks`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from families import VOCAB_SIZE

from saekit.cli import main
from saekit.models import HFBackend, load_model
from saekit.models.tiny import tiny_gpt2

Folder = Callable[[str], Path]


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    ids = torch.randint(5, VOCAB_SIZE, (2, 9), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = 0  # the pad id of BERT and T5: transformers warns when it sees it unmasked
    return ids


def _assert_quiet(capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    printed = "".join(capfd.readouterr()) + caplog.text
    for word in ("LOAD REPORT", "MISSING", "UNEXPECTED", "newly initialized", "attention_mask"):
        assert word not in printed


# Encoders


@pytest.mark.parametrize(
    ("family", "cls", "layer"),
    [
        ("bert", "BertModel", "encoder.layer.1"),
        ("sentence_transformers", "BertModel", "encoder.layer.1"),
        ("t5_encoder", "T5EncoderModel", "encoder.block.1"),
    ],
)
def test_encoders_load_as_base_models(
    family_folder: Folder, tokens, capfd, caplog, family: str, cls: str, layer: str
) -> None:
    caplog.set_level(logging.WARNING)
    backend = load_model(family_folder(family))
    assert isinstance(backend, HFBackend)
    assert type(backend.model).__name__ == cls
    assert backend.causal_lm is False
    names = backend.hook_names()
    assert f"{layer}.output" in names
    assert not any(n.startswith(("encoder.layer.input", "encoder.layer.output",
                                 "encoder.block.input", "encoder.block.output")) for n in names)
    acts = backend.activations(tokens, [f"{layer}.output", "blocks.1.hook_resid_post"])
    with torch.no_grad():
        hidden = backend.model(
            tokens, attention_mask=torch.ones_like(tokens), output_hidden_states=True
        ).hidden_states
    torch.testing.assert_close(acts["blocks.1.hook_resid_post"], acts[f"{layer}.output"])
    if family != "t5_encoder":  # T5's last hidden state is after its final norm
        torch.testing.assert_close(acts[f"{layer}.output"], hidden[2])
    with pytest.raises(ValueError, match="has no next-token head"):
        backend.logits(tokens)
    _assert_quiet(capfd, caplog)


def test_masked_lm_checkpoint_drops_head_and_missing_pooler(family_folder: Folder) -> None:
    mlm = load_model(family_folder("bert"))
    assert mlm.model.pooler is None  # not in a BertForMaskedLM checkpoint: no random pooler
    assert not any(n.startswith(("cls.", "pooler.")) for n in mlm.hook_names())
    # A sentence-transformers folder holds a BertModel, pooler included.
    st = load_model(family_folder("sentence_transformers"))
    assert "pooler.output" in st.hook_names()


def test_t5_seq2seq_checkpoint_loads_its_encoder(tmp_path: Path, capfd, caplog) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    caplog.set_level(logging.WARNING)
    config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                      decoder_start_token_id=0)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    capfd.readouterr()
    backend = load_model(tmp_path)
    assert type(backend.model).__name__ == "T5EncoderModel"
    assert backend.activations(torch.tensor([[1, 2, 3]]), ["encoder.block.1.output"])[
        "encoder.block.1.output"
    ].shape == (1, 3, 16)
    _assert_quiet(capfd, caplog)


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt"])
def test_decoder_folders_load_as_causal_lms(family_folder: Folder, family: str) -> None:
    backend = load_model(family_folder(family))
    assert type(backend.model).__name__.endswith("ForCausalLM")
    assert backend.causal_lm is True
    assert backend.logits(torch.tensor([[3, 4, 5]])).shape == (1, 3, VOCAB_SIZE)


def test_decoder_base_model_folder_has_no_logits(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    LlamaModel(config).save_pretrained(tmp_path)
    backend = load_model(tmp_path)
    assert type(backend.model).__name__ == "LlamaModel"
    assert backend.causal_lm is False
    # The TransformerLens names follow the base model's own paths.
    assert backend._sites["blocks.1.hook_mlp_out"].path == "layers.1.mlp"
    acts = backend.activations(torch.tensor([[1, 2, 3]]), ["blocks.1.hook_mlp_out"])
    assert acts["blocks.1.hook_mlp_out"].shape == (1, 3, 16)


def test_causal_lm_attribute_defaults(family_folder: Folder) -> None:
    from saekit.models.tiny import tiny_hooked_transformer

    assert load_model(tiny_hooked_transformer(300)).causal_lm is True
    assert load_model(tiny_gpt2(300)).causal_lm is True


# Names recorded in metadata


def test_relative_folder_is_recorded_absolute(
    family_folder: Folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = family_folder("gpt2")
    monkeypatch.chdir(folder.parent)
    backend = load_model(folder.name)
    assert backend.name == str(folder.resolve())
    assert Path(backend.name).is_absolute()


def test_model_object_records_its_name_or_path(
    family_folder: Folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    folder = family_folder("gpt2")
    monkeypatch.chdir(folder.parent)
    model = AutoModelForCausalLM.from_pretrained(folder.name)
    assert load_model(model).name == str(folder.resolve())
    # A model built from a config has no name: its class stands in.
    assert load_model(tiny_gpt2(300)).name == "GPT2LMHeadModel"


def test_transformer_lens_backend_refuses_folders(family_folder: Folder) -> None:
    with pytest.raises(ValueError, match="loads models by their official names only"):
        load_model(family_folder("gpt2"), backend="transformer_lens")
    with pytest.raises(ValueError, match="device_map shards Hugging Face models"):
        load_model("gpt2-small", backend="transformer_lens", device_map="auto")


# Hook names and their errors


def test_containers_are_not_hooks(family_folder: Folder) -> None:
    backend = load_model(family_folder("llama"))
    names = backend.hook_names()
    assert "model.layers.output" not in names and "model.layers.input" not in names
    assert "model.layers.1.output" in names
    with pytest.raises(ValueError) as err:
        backend.activations(torch.tensor([[1, 2]]), ["model.layers.outputs"])
    assert "model.layers.output," not in str(err.value)


def test_suggestions_follow_the_naming_style(family_folder: Folder) -> None:
    backend = load_model(family_folder("llama"))
    ids = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="closest valid hook names: blocks.1.hook_mlp_out") as err:
        backend.activations(ids, ["blocks.1.hook_mlp_outt"])
    assert "model.layers" not in str(err.value)
    with pytest.raises(ValueError, match="model.layers.1.mlp.output") as err:
        backend.activations(ids, ["model.layers.1.mlp.outptu"])
    assert "blocks." not in str(err.value).split("closest valid hook names:")[1]


def test_unmapped_family_explains_its_tl_names() -> None:
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    config = GPTNeoConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2,
                          attention_types=[[["global"], 2]], max_position_embeddings=32)
    backend = load_model(GPTNeoForCausalLM(config))
    assert "blocks.1.hook_resid_pre" in backend.hook_names()
    with pytest.raises(ValueError, match="saekit maps only blocks.N.hook_resid_pre"):
        backend.activations(torch.tensor([[1, 2]]), ["blocks.1.hook_mlp_out"])


def test_bundled_mlp_out_alias_is_the_mlp_output() -> None:
    """The transcoder's default output hook (blocks.N.hook_mlp_out) works on the bundled
    model's Hugging Face backend."""
    backend = load_model("bundled")
    ids = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(0))
    acts = backend.activations(ids, ["blocks.1.hook_mlp_out", "transformer.h.1.mlp.output"])
    torch.testing.assert_close(acts["blocks.1.hook_mlp_out"], acts["transformer.h.1.mlp.output"])
    assert acts["blocks.1.hook_mlp_out"].shape == (2, 16, 256)


# saekit hooks


def test_hooks_command_lists_names_and_widths(family_folder: Folder, capsys) -> None:
    assert main(["hooks", str(family_folder("llama"))]) == 0
    out = capsys.readouterr().out
    rows = {line.split("  ")[0]: line.split()[1:] for line in out.splitlines() if line}
    assert rows["blocks.1.attn.hook_z"] == ["4", "x", "16"]
    assert rows["blocks.0.hook_resid_mid"] == ["64"]
    assert rows["model.layers.0.mlp.down_proj.input"] == ["128"]
    assert "model.layers.output" not in rows


def test_hooks_command_on_an_encoder_and_errors(family_folder: Folder, capsys) -> None:
    assert main(["hooks", str(family_folder("bert")), "--match", "encoder.layer.0.output"]) == 0
    out = capsys.readouterr().out
    assert "an encoder" in out and "encoder.layer.0.output.dense.output" in out
    assert main(["hooks", str(family_folder("bert")), "--match", "no-such-hook"]) == 2
    assert "saekit: error: no hook of" in capsys.readouterr().err
