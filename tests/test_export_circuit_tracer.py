"""`saekit export circuit-tracer`: a loader written here from circuit-tracer's documented
format gives the transcoders' latents and outputs.

What the loader below knows of the format (from circuit-tracer's config README, its
`load_transcoders` / `load_transcoder_set` and `SingleLayerTranscoder`): config.yaml with
model_kind "transcoder_set", model_name, feature_input_hook and feature_output_hook, an
optional `activation` ("relu", or absent to let each file decide) and an optional
`transcoders` list of files in layer order (without it, layer_<i>.safetensors beside the
config for i = 0 .. count-1); per layer W_enc [d_sae, d_model] (pre = F.linear(x, W_enc,
b_enc)), b_enc, W_dec [d_sae, d_model] (out = f @ W_dec + b_dec), b_dec, optional W_skip
(out += x @ W_skip.T) and optional activation_function.threshold (f = pre * (pre >
threshold)); without a threshold f = ReLU(pre).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from sae_factory import random_sae
from safetensors.torch import load_file

from saekit import SAE
from saekit.cli import main
from saekit.errors import SaekitError
from saekit.export import export_circuit_tracer

D_MODEL, D_SAE = 8, 16
ARCHITECTURES = ["transcoder", "skip_transcoder", "jumprelu_transcoder",
                 "jumprelu_skip_transcoder"]


def transcoder(architecture: str, layer: int, seed: int | None = None, **fields) -> SAE:
    sae = random_sae(architecture, D_MODEL, D_SAE, seed=layer if seed is None else seed,
                     d_out=D_MODEL, **fields)
    sae.cfg.metadata.hook_name = f"blocks.{layer}.ln2.hook_normalized"
    sae.cfg.metadata.hook_name_out = f"blocks.{layer}.hook_mlp_out"
    sae.cfg.metadata.model_name = "openai-community/gpt2"
    return sae


class LoadedLayer:
    """One layer as circuit-tracer computes it, from the files alone."""

    def __init__(self, path: Path, activation: str | None) -> None:
        t = load_file(str(path))
        self.W_enc, self.b_enc = t["W_enc"].double(), t["b_enc"].double()
        self.W_dec, self.b_dec = t["W_dec"].double(), t["b_dec"].double()
        self.W_skip = t["W_skip"].double() if "W_skip" in t else None
        threshold = t.get("activation_function.threshold")
        self.threshold = None if activation == "relu" or threshold is None else threshold.double()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.nn.functional.linear(x.double(), self.W_enc, self.b_enc)
        if self.threshold is None:
            return torch.relu(pre)
        return pre * (pre > self.threshold)

    def decode(self, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = f.double() @ self.W_dec + self.b_dec
        return out if self.W_skip is None else out + x.double() @ self.W_skip.T


def load_set(folder: Path) -> tuple[dict, list[LoadedLayer]]:
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set"
    if "transcoders" in config:
        paths = [Path(p) for p in config["transcoders"]]
    else:
        count = len(list(folder.glob("layer_*.safetensors")))
        paths = [folder / f"layer_{i}.safetensors" for i in range(count)]
    return config, [LoadedLayer(p, config.get("activation")) for p in paths]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_loaded_files_compute_what_saekit_computes(architecture: str, tmp_path) -> None:
    saes = [transcoder(architecture, layer) for layer in (2, 0, 1)]  # any order
    export_circuit_tracer(saes, tmp_path / "set", progress=False)
    config, layers = load_set(tmp_path / "set")
    assert config["model_name"] == "openai-community/gpt2"
    assert config["feature_input_hook"] == "ln2.hook_normalized"
    assert config["feature_output_hook"] == "hook_mlp_out"
    assert len(layers) == 3
    x = torch.randn(64, D_MODEL, generator=torch.Generator().manual_seed(5))
    for sae in saes:
        layer = int(sae.cfg.metadata.hook_name.split(".")[1])
        loaded = layers[layer]
        with torch.no_grad():
            latents = sae.encode(x)
            assert (latents > 0).float().mean() > 0.1  # the comparison covers firing latents
            assert torch.allclose(loaded.encode(x), latents.double(), atol=1e-6, rtol=0)
            assert torch.allclose(loaded.decode(latents, x), sae(x).double(), atol=1e-6, rtol=0)


def test_negative_thresholds_and_input_centring_are_exported_exactly(tmp_path) -> None:
    sae = transcoder("jumprelu_transcoder", 0, apply_b_dec_to_input=True)
    with torch.no_grad():
        sae.threshold[:4] = -0.3  # saekit's rule still zeroes negative pre-activations
    export_circuit_tracer([sae], tmp_path / "set", progress=False)
    _, (loaded,) = load_set(tmp_path / "set")
    x = torch.randn(64, D_MODEL, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.allclose(loaded.encode(x), sae.encode(x).double(), atol=1e-6, rtol=0)
        assert torch.allclose(loaded.decode(sae.encode(x), x), sae(x).double(), atol=1e-6,
                              rtol=0)


def test_files_have_circuit_tracers_names_shapes_and_keys(tmp_path) -> None:
    saes = [transcoder("jumprelu_skip_transcoder", n) for n in range(2)]
    out = export_circuit_tracer(saes, tmp_path / "set", local_paths=True, progress=False)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert set(config) == {"model_kind", "model_name", "feature_input_hook",
                           "feature_output_hook", "transcoders"}
    assert config["transcoders"] == [str(out / f"layer_{n}.safetensors") for n in range(2)]
    shapes = {name: tuple(t.shape) for name, t in load_file(config["transcoders"][1]).items()}
    assert shapes == {"W_enc": (D_SAE, D_MODEL), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_MODEL),
                      "b_dec": (D_MODEL,), "W_skip": (D_MODEL, D_MODEL),
                      "activation_function.threshold": (D_SAE,)}
    relu = export_circuit_tracer([transcoder("transcoder", 0)], tmp_path / "relu",
                                 progress=False)
    assert yaml.safe_load((relu / "config.yaml").read_text())["activation"] == "relu"


def test_what_circuit_tracer_cannot_represent_is_refused(tmp_path) -> None:
    out = tmp_path / "set"
    cases = [
        ([random_sae("topk", D_MODEL, D_SAE, k=4)], "'topk' SAE"),
        ([transcoder("transcoder", 0), transcoder("transcoder", 2)], r"layer\(s\) \[1\]"),
        ([transcoder("transcoder", 0), transcoder("transcoder", 0, seed=3)], "both sit at layer 0"),
        ([transcoder("transcoder", 0), transcoder("skip_transcoder", 1)], "skip path"),
        ([random_sae("transcoder", D_MODEL, D_SAE)], "d_in must equal d_out"),
    ]
    mixed = transcoder("transcoder", 1)
    mixed.cfg.metadata.hook_name = "blocks.1.hook_resid_mid"
    cases.append(([transcoder("transcoder", 0), mixed], "one pair of hooks"))
    unplaced = transcoder("transcoder", 0)
    unplaced.cfg.metadata.hook_name_out = None
    cases.append(([unplaced], "hook_name_out is None"))
    for saes, message in cases:
        if saes[0].cfg.metadata.hook_name is None:
            saes[0].cfg.metadata.hook_name = "blocks.0.ln2.hook_normalized"
        with pytest.raises(ValueError, match=message):
            export_circuit_tracer(saes, out, progress=False)
        assert not out.exists()
    with pytest.raises(ValueError, match="no transcoders"):
        export_circuit_tracer([], out)
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(SaekitError, match="already holds files"):
        export_circuit_tracer([transcoder("transcoder", 0)], out, progress=False)
    assert (out / "mine.txt").read_text() == "keep"


def test_cli_exports_saved_transcoders(tmp_path, capsys) -> None:
    for layer in range(2):
        transcoder("skip_transcoder", layer).save(tmp_path / f"tc{layer}")
    out = tmp_path / "set"
    code = main(["export", "circuit-tracer", str(tmp_path / "tc1"), str(tmp_path / "tc0"),
                 "--out", str(out), "--model-name", "gpt2"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.out.strip() == str(out.resolve())
    config, layers = load_set(out)
    assert config["model_name"] == "gpt2" and len(layers) == 2
    random_sae("standard", D_MODEL, D_SAE).save(tmp_path / "plain")
    code = main(["export", "circuit-tracer", str(tmp_path / "plain"), "--out",
                 str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("saekit: error:") and "'standard' SAE" in err
