"""The native folder format: round trips, both cfg.json layouts, atomic writes, bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from sae_factory import random_sae
from safetensors.torch import save_file

from saekit import SAE, SAEConfig, architecture_class, list_architectures
from saekit.io import native
from saekit.io.cfg_layout import config_from_dict


@pytest.mark.parametrize(
    "architecture",
    [a for a in list_architectures() if not architecture_class(a).multi_site],  # CLTs: own tests
)
def test_every_architecture_round_trips(tmp_path: Path, architecture: str) -> None:
    sae = random_sae(architecture)
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_pre"
    x = torch.randn(7, 8)
    sparsity = torch.randn(32)
    sae.save(tmp_path / "sae", sparsity=sparsity)
    loaded = SAE.load(tmp_path / "sae")
    assert loaded.cfg.architecture == sae.published().cfg.architecture
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x), sae(x))
    assert torch.equal(native.read_sae_folder(tmp_path / "sae").sparsity, sparsity)
    assert loaded.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
    # Saving the loaded SAE again writes the same config.
    loaded.save(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "cfg.json").read_text())
    assert again == json.loads((tmp_path / "sae" / "cfg.json").read_text())


def test_load_options_device_and_dtype(tmp_path: Path) -> None:
    random_sae("standard").save(tmp_path / "s")
    sae = SAE.load(tmp_path / "s", device="cpu", dtype="float64")
    assert sae.W_enc.dtype == torch.float64 and sae.cfg.dtype == "float64"


FLAT_CFG = {
    "model_name": "gpt2-small",
    "hook_point": "blocks.8.hook_resid_pre",
    "hook_point_layer": 8,
    "hook_point_head_index": None,
    "d_in": 8,
    "d_sae": 32,
    "dtype": "torch.float32",
    "device": "cuda",
    "activation_fn_str": "topk",
    "activation_fn_kwargs": {"k": 5},
    "apply_b_dec_to_input": False,
    "normalize_activations": False,
    "context_size": 128,
    "dataset_path": "Skylion007/openwebtext",
    "prepend_bos": True,
    "finetuning_scaling_factor": False,
}


def test_flat_layout_aliases_translate() -> None:
    cfg = config_from_dict(FLAT_CFG)
    assert cfg.architecture == "topk" and cfg.k == 5
    assert cfg.metadata.hook_name == "blocks.8.hook_resid_pre"
    assert cfg.metadata.model_name == "gpt2-small" and cfg.metadata.context_size == 128
    assert cfg.normalize_activations == "none" and cfg.apply_b_dec_to_input is False
    assert cfg.dtype == "float32"
    assert cfg.metadata.extra["hook_point_layer"] == 8
    # The current layout round-trips through SAEConfig unchanged.
    current = cfg.to_dict()
    assert "metadata" in current and "hook_point" not in current
    assert config_from_dict(current) == cfg


@pytest.mark.parametrize(
    ("changes", "architecture", "normalize"),
    [
        ({"activation_fn_str": "relu", "activation_fn_kwargs": {}}, "standard", "none"),
        ({"hook_name": "blocks.2.hook_z", "hook_point": None}, "topk", "none"),
        ({"normalize_activations": True}, "topk", "expected_average_only_in"),
        ({"normalize_activations": "constant_norm_rescale"}, "topk", "constant_norm_rescale"),
        ({"architecture": "jumprelu"}, "jumprelu", "none"),
    ],
)
def test_flat_layout_variants(changes: dict, architecture: str, normalize: str) -> None:
    raw = {**FLAT_CFG, **changes}
    raw = {k: v for k, v in raw.items() if v is not None or k != "hook_point"}
    cfg = config_from_dict(raw)
    assert cfg.architecture == architecture
    assert cfg.normalize_activations == normalize
    assert cfg.metadata.hook_name is not None


def test_flat_folder_with_finetuning_scale_loads(tmp_path: Path) -> None:
    sae = random_sae("standard")
    folder = tmp_path / "old"
    folder.mkdir()
    raw = {**FLAT_CFG, "activation_fn_str": "relu", "finetuning_scaling_factor": True}
    (folder / "cfg.json").write_text(json.dumps(raw))
    scale = torch.rand(32) + 0.5
    tensors = {k: v.clone() for k, v in sae.state_dict().items()}
    tensors["scaling_factor"] = scale
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    loaded = SAE.load(folder)
    x = torch.randn(4, 8)
    f = torch.relu(x @ sae.W_enc + sae.b_enc)  # apply_b_dec_to_input is False here
    assert torch.allclose(loaded(x), (f * scale) @ sae.W_dec + sae.b_dec, atol=1e-5)


# ----- atomic writes --------------------------------------------------------------------------


def test_crash_while_writing_a_new_folder_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(native, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        random_sae("standard").save(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert list(tmp_path.iterdir()) == []


def test_crash_while_overwriting_keeps_the_old_sae(tmp_path: Path, monkeypatch) -> None:
    old = random_sae("standard", seed=1)
    old.save(tmp_path / "s")
    (tmp_path / "s" / "notes.txt").write_text("mine")
    real_save = safetensors.torch.save_file

    def half_write(tensors, filename, *args, **kwargs):
        real_save(tensors, filename)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])  # truncated
        raise OSError("killed")

    monkeypatch.setattr(native, "save_file", half_write)
    with pytest.raises(OSError):
        random_sae("standard", seed=2).save(tmp_path / "s")
    x = torch.randn(3, 8)
    assert torch.equal(SAE.load(tmp_path / "s")(x), old(x))
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "cfg.json",
        "notes.txt",
        "sae_weights.safetensors",
    ]


def test_overwrite_replaces_files_and_keeps_others(tmp_path: Path) -> None:
    random_sae("standard", seed=1).save(tmp_path / "s", sparsity=torch.zeros(32))
    (tmp_path / "s" / "checkpoints").mkdir()
    new = random_sae("jumprelu", seed=2)
    new.save(tmp_path / "s")
    x = torch.randn(3, 8)
    assert torch.equal(SAE.load(tmp_path / "s")(x), new(x))
    assert not (tmp_path / "s" / "sparsity.safetensors").exists()  # stale stats removed
    assert (tmp_path / "s" / "checkpoints").is_dir()


# ----- bad input ------------------------------------------------------------------------------


def test_missing_folder_and_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SAE.load(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        SAE.load(tmp_path / "file")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        random_sae("standard").save(tmp_path / "file")


def test_missing_and_corrupt_files_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    random_sae("standard").save(folder)
    (folder / "sae_weights.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="sae_weights.safetensors.*corrupt"):
        SAE.load(folder)
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors"):
        SAE.load(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="cfg.json is not valid JSON"):
        SAE.load(folder)
    (folder / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match="cfg.json not found"):
        SAE.load(folder)


def test_missing_config_key_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    random_sae("standard").save(folder)
    raw = json.loads((folder / "cfg.json").read_text())
    del raw["d_sae"]
    (folder / "cfg.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="'d_sae'"):
        SAE.load(folder)
    raw["d_sae"] = 32
    raw["architecture"] = "mystery"
    (folder / "cfg.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="unknown SAE architecture 'mystery'.*standard"):
        SAE.load(folder)


def test_missing_and_misshapen_tensors_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    sae = random_sae("jumprelu")
    sae.save(folder)
    tensors = {k: v.clone() for k, v in sae.state_dict().items()}
    del tensors["threshold"]
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"\['threshold'\] missing in .*sae_weights"):
        SAE.load(folder)
    tensors["threshold"] = torch.zeros(31)
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"'threshold'.*shape \(31,\).*needs \(32,\)"):
        SAE.load(folder)


def test_config_validation_errors() -> None:
    with pytest.raises(ValueError, match="d_in must be a positive integer"):
        SAEConfig(architecture="standard", d_in=0, d_sae=4)
    with pytest.raises(ValueError, match="normalize_activations='sometimes'"):
        SAEConfig(architecture="standard", d_in=4, d_sae=4, normalize_activations="sometimes")
    with pytest.raises(ValueError, match="needs k"):
        SAE.from_config(SAEConfig(architecture="topk", d_in=4, d_sae=8))
    with pytest.raises(ValueError, match="only transcoders"):
        SAE.create("standard", 4, 8, d_out=5)


# ----- one reader for SAE.load and from_pretrained ---------------------------------------------


def hub_like_folder(tmp_path: Path, architecture: str) -> tuple[Path, str]:
    """A repo folder holding one native SAE under `layer0/`, with a sparsity file and an older
    release's per-latent decoder scale (folded into W_dec on reading)."""
    folder = random_sae(architecture).save(tmp_path / "repo" / "layer0", sparsity=torch.randn(32))
    tensors = safetensors.torch.load_file(str(folder / "sae_weights.safetensors"))
    tensors["scaling_factor"] = torch.rand(32) + 0.5
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return folder, "layer0"


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_load_and_from_pretrained_read_a_native_folder_alike(
    tmp_path: Path, architecture: str
) -> None:
    folder, sae_id = hub_like_folder(tmp_path, architecture)
    loaded = SAE.load(folder)
    pretrained = SAE.from_pretrained(str(tmp_path / "repo"), sae_id)
    assert pretrained.sae.cfg.to_dict() == loaded.cfg.to_dict()
    want, got = loaded.state_dict(), pretrained.sae.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[name], got[name]) for name in want)
    assert torch.equal(pretrained.sparsity, native.read_sae_folder(folder).sparsity)


def test_a_huge_d_sae_fails_from_the_header_through_both_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, sae_id = hub_like_folder(tmp_path, "standard")
    raw = json.loads((folder / "cfg.json").read_text())
    raw["d_sae"] = 10**12
    (folder / "cfg.json").write_text(json.dumps(raw))

    def no_tensor_reads(file: Path) -> dict[str, torch.Tensor]:
        raise AssertionError(f"{file} was read before its header was checked")

    monkeypatch.setattr(native, "read_safetensors", no_tensor_reads)
    weights = str(folder / "sae_weights.safetensors")
    for load in (
        lambda: SAE.load(folder),
        lambda: SAE.from_pretrained(str(tmp_path / "repo"), sae_id),
    ):
        start = time.perf_counter()
        with pytest.raises(ValueError, match=r"'W_enc' in .* has shape \(8, 32\)") as err:
            load()
        assert weights in str(err.value)
        assert time.perf_counter() - start < 1.0
