"""Settings and files that must be refused before any work: numeric settings out of range or
not finite, cfg.json fields of the wrong type, weights that disagree with their config
(found from the file headers, before anything is allocated), and caches whose progress.json
points outside their folder."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
import typing
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sae_factory import random_sae
from safetensors.torch import load_file, save_file

from saekit import SAE, SAEConfig
from saekit.cli import main
from saekit.data.cache import CachedActivations, CacheError, write_activation_cache
from saekit.finite import NonFiniteWeights
from saekit.models import load_model
from saekit.models.tiny import TINY_TEXTS, tiny_gpt2, tiny_tokenizer
from saekit.training import ConfigError, TrainConfig
from saekit.training.config import SECTIONS

# ----- every numeric setting -----------------------------------------------------------------

#: Every int and float field of every section, with a value just outside its range (written
#: out here, independently of the config's own table).
OUT_OF_RANGE: dict[str, object] = {
    "sae.d_sae": 0,
    "sae.expansion_factor": 0,
    "sae.k": 0,
    "sae.matryoshka_widths": [0, 64],
    "data.context_size": 0,
    "data.eval_tokens": -1,
    "data.shuffle_tokens": -1,
    "training.tokens": 0,
    "training.batch_size": 0,
    "training.lr": 0.0,
    "training.lr_warmup_tokens": -1,
    "training.lr_decay_fraction": 1.5,
    "training.sparsity_coefficient": -1.0,
    "training.sparsity_warmup_tokens": -1,
    "training.target_l0": 0.0,
    "training.l0_controller_gain": -0.1,
    "training.aux_k_coefficient": -0.5,
    "training.dead_after_tokens": -1,
    "training.dead_pre_act_coefficient": -1.0,
    "training.quiet_after_tokens": 0,
    "training.resample_every_tokens": -1,
    "training.resample_until": 1.5,
    "training.lift_share": 0.0,
    "training.grad_clip": -1.0,
    "training.threshold_bandwidth": 0.0,
    "training.threshold_pre_act_coefficient": -1.0,
    "run.seed": -1,
    "run.checkpoint_every": 0,
    "run.keep_checkpoints": 0,
    "run.log_every": 0,
    "run.seeds": [-1],
    "run.eval_every": 0,
    "run.eval_every_tokens": 0,
}

#: Settings that hold a list of whole numbers (each checked, the list itself not a number).
LIST_SETTINGS = {"sae.matryoshka_widths", "run.seeds"}


def numeric_fields() -> dict[str, type]:
    """{"training.lr": float, ...} for every int, float or list-of-int field."""
    out = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds = set(typing.get_args(hints[f.name])) | {hints[f.name]}
            for kind in (int, float, list[int]):
                if kind in kinds:
                    out[f"{section}.{f.name}"] = float if kind is float else int
    return out


def config_with(name: str, value: object) -> dict:
    section, key = name.split(".")
    return {section: {key: value}}


def test_the_table_covers_every_numeric_setting() -> None:
    assert set(numeric_fields()) == set(OUT_OF_RANGE)


@pytest.mark.parametrize("name", sorted(OUT_OF_RANGE))
def test_a_value_out_of_range_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"{name} must be "):
        TrainConfig.from_dict(config_with(name, OUT_OF_RANGE[name]))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", sorted(n for n, k in numeric_fields().items() if k is float))
def test_nan_and_infinity_are_refused_for_every_float_setting(name: str, value: float) -> None:
    expected = rf"{name} must be a finite number( or null)?, got {value}"
    with pytest.raises(ConfigError, match=expected):
        TrainConfig.from_dict(config_with(name, value))
    # The same from a file or flag, where the value is text.
    with pytest.raises(ConfigError, match=rf"{name} must be a finite number"):
        TrainConfig.from_dict(config_with(name, str(value)))


@pytest.mark.parametrize(
    "name", sorted(n for n, k in numeric_fields().items() if k is int and n not in LIST_SETTINGS)
)
def test_whole_number_settings_refuse_fractions_nan_and_bools(name: str) -> None:
    section, key = name.split(".")
    for value in ("nan", "inf", 2.5):
        with pytest.raises(ConfigError, match=rf"{name}"):
            TrainConfig.from_dict(config_with(name, value))
    # Built directly (no coercion): the value's type itself is checked.
    for value in (math.nan, 2.5, True):
        with pytest.raises(ConfigError, match=rf"{key} must be a whole number"):
            SECTIONS[section](**{key: value})


def test_the_cli_reports_every_bad_number_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([
        "train", "--grad-clip", "nan", "--aux-k-coefficient", "-1", "--l1-coefficient", "nan",
        "--jumprelu-bandwidth", "nan", "--l0-controller-gain", "nan", "--seed", "-3",
        "--out", str(tmp_path / "run"),
    ])
    assert code == 2
    err = capsys.readouterr().err
    for expected in (
        "training.grad_clip must be a finite number, got nan",
        "training.aux_k_coefficient must be >= 0, got -1.0",
        "training.sparsity_coefficient must be a finite number, got nan",
        "training.threshold_bandwidth must be a finite number, got nan",
        "training.l0_controller_gain must be a finite number, got nan",
        "run.seed must be in [0, 4294967296), got -3",
    ):
        assert expected in err, expected
    assert "(6 problem(s))" in err
    assert not (tmp_path / "run").exists()


# ----- cfg.json fields and the tensors beside them -------------------------------------------


def saved(tmp_path: Path, architecture: str = "topk", **fields: object) -> Path:
    return random_sae(architecture, **fields).save(tmp_path / "sae")


def edit_cfg(folder: Path, **changes: object) -> None:
    raw = json.loads((folder / "cfg.json").read_text())
    for key, value in changes.items():
        if key.startswith("metadata."):
            raw["metadata"][key.split(".", 1)[1]] = value
        else:
            raw[key] = value
    (folder / "cfg.json").write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"k": 3.5}, "k must be a whole number or null, got 3.5"),
        ({"k": "4"}, "k must be a whole number or null, got '4'"),
        ({"apply_b_dec_to_input": "no"}, "apply_b_dec_to_input must be true or false, got 'no'"),
        ({"apply_b_dec_to_input": 0}, "apply_b_dec_to_input must be true or false, got 0"),
        ({"rescale_acts_by_decoder_norm": "false"}, "rescale_acts_by_decoder_norm must be true"),
        ({"d_in": "8"}, "d_in must be a positive integer, got '8'"),
        ({"d_sae": True}, "d_sae must be a positive integer, got True"),
        ({"architecture": 3}, "architecture must be a string, got 3"),
        ({"dtype": 32}, "dtype must be a string, got 32"),
        ({"normalize_activations": 1.5}, "normalize_activations must be a string or a bool"),
        ({"metadata.context_size": "128"}, "metadata.context_size must be a whole number"),
        ({"metadata.prepend_bos": "yes"}, "metadata.prepend_bos must be true or false"),
        ({"metadata.hook_name": 8}, "metadata.hook_name must be a string or null, got 8"),
    ],
)
def test_a_cfg_field_of_the_wrong_type_is_refused(
    tmp_path: Path, changes: dict, message: str
) -> None:
    folder = saved(tmp_path)
    edit_cfg(folder, **changes)
    with pytest.raises(ValueError, match=rf"cfg\.json: {message}") as err:
        SAE.load(folder)
    assert len(str(err.value).splitlines()) == 1


def test_a_whole_float_k_reads_as_that_number(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    edit_cfg(folder, k=4.0)
    assert SAE.load(folder).cfg.k == 4
    with pytest.raises(ValueError, match="k must be a whole number"):
        SAEConfig("topk", d_in=8, d_sae=32, k=3.5)


def test_a_sparsity_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    folder = random_sae("standard").save(tmp_path / "sae", sparsity=torch.full((32,), -2.0))
    save_file({"sparsity": torch.full((31,), -2.0)}, str(folder / "sparsity.safetensors"))
    with pytest.raises(ValueError, match=r"sparsity\.safetensors: 'sparsity' has shape \(31,\)"):
        SAE.load(folder)


def test_a_nan_sparsity_is_refused_but_minus_infinity_is_a_silent_latent(tmp_path: Path) -> None:
    sparsity = torch.full((32,), -2.0)
    sparsity[0] = -math.inf  # never fired: log10(0)
    folder = random_sae("standard").save(tmp_path / "sae", sparsity=sparsity)
    SAE.load(folder)
    sparsity[9] = math.nan
    save_file({"sparsity": sparsity}, str(folder / "sparsity.safetensors"))
    with pytest.raises(NonFiniteWeights, match=r"sparsity\.safetensors: .* latent 9"):
        SAE.load(folder)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused_naming_file_and_tensor(
    tmp_path: Path, value: float
) -> None:
    folder = saved(tmp_path, "jumprelu")
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    tensors["threshold"][5] = value
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    with pytest.raises(
        NonFiniteWeights,
        match=rf"sae_weights\.safetensors: 'threshold' holds {value} at index \[5\]",
    ):
        SAE.load(folder)
    with pytest.raises(NonFiniteWeights, match="'threshold' holds"):
        SAE.from_pretrained(str(folder))


@pytest.mark.parametrize("d_sae", [4_000_000, 10**12])
def test_a_huge_declared_d_sae_fails_at_once_from_the_header(tmp_path: Path, d_sae: int) -> None:
    folder = saved(tmp_path, "standard")
    assert (folder / "sae_weights.safetensors").stat().st_size < 8192
    edit_cfg(folder, d_sae=d_sae)
    for load in (lambda: SAE.load(folder), lambda: SAE.from_pretrained(str(folder))):
        start = time.perf_counter()
        with pytest.raises(ValueError, match=rf"'W_enc' in .*has shape \(8, 32\) .*\(8, {d_sae}\)"):
            load()
        # A d_sae of 4,000,000 took 4 s and 1.5 GB when the SAE was built first.
        assert time.perf_counter() - start < 1.0


def test_a_misshapen_decoder_scale_is_named(tmp_path: Path) -> None:
    folder = saved(tmp_path, "standard")
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    tensors["scaling_factor"] = torch.ones(5)
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"'scaling_factor' in .* shape \(5,\).*\(32,\)"):
        SAE.load(folder)
    with pytest.raises(ValueError, match=r"'scaling_factor' in .* shape \(5,\)"):
        SAE.from_pretrained(str(folder))


def test_weights_of_an_integer_dtype_are_refused(tmp_path: Path) -> None:
    folder = saved(tmp_path, "standard")
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    tensors["b_enc"] = torch.zeros(32, dtype=torch.int64)
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="'b_enc' in .* has dtype I64"):
        SAE.load(folder)


def test_a_weights_header_that_lies_about_its_bytes_is_refused(tmp_path: Path) -> None:
    folder = saved(tmp_path, "standard")
    file = folder / "sae_weights.safetensors"
    data = file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["W_enc"]["shape"] = [8, 10**9]
    raw = json.dumps(header).encode()
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length :])
    with pytest.raises(ValueError, match=r"'W_enc' of shape \[8, 1000000000\] does not match"):
        SAE.load(folder)


# ----- foreign formats -----------------------------------------------------------------------


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def gemma_arrays(d_in: int = 8, d_sae: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "W_enc": rng.standard_normal((d_in, d_sae), dtype=np.float32),
        "W_dec": rng.standard_normal((d_sae, d_in), dtype=np.float32),
        "b_enc": np.zeros(d_sae, np.float32),
        "b_dec": np.zeros(d_in, np.float32),
        "threshold": np.full(d_sae, 0.1, np.float32),
    }


def test_an_npz_whose_arrays_disagree_is_refused_before_reading_them(tmp_path: Path) -> None:
    folder = tmp_path / "layer_3/width_16k/average_l0_5"
    folder.mkdir(parents=True)
    arrays = gemma_arrays()
    arrays["threshold"] = np.full(15, 0.1, np.float32)
    np.savez(folder / "params.npz", **arrays)
    with pytest.raises(ValueError, match=r"params\.npz: threshold has shape \[15\], but W_enc"):
        SAE.from_pretrained(str(tmp_path), "layer_3/width_16k/average_l0_5")


def test_an_npz_that_inflates_far_beyond_its_size_is_refused_without_inflating(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "layer_3/width_16k/average_l0_5"
    folder.mkdir(parents=True)
    d_in, d_sae = 8, 8 * 2**20  # W_enc alone: 256 MiB of zeros
    arrays = gemma_arrays(d_in, d_sae=16)
    with zipfile.ZipFile(folder / "params.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("W_enc.npy", "w", force_zip64=True) as member:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                header, {"descr": "<f4", "fortran_order": False, "shape": (d_in, d_sae)}
            )
            member.write(np.lib.format.magic(1, 0) + header.getvalue())
            zeros = bytes(2**24)
            for _ in range(d_in * d_sae * 4 // len(zeros)):
                member.write(zeros)
        for name in ("W_dec", "b_enc", "b_dec", "threshold"):
            archive.writestr(f"{name}.npy", npy_bytes(arrays[name]))
    size = (folder / "params.npz").stat().st_size
    assert size < 2**20
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"params\.npz could not be read as \.npz \(its arrays "):
        SAE.from_pretrained(str(tmp_path), "layer_3/width_16k/average_l0_5")
    assert time.perf_counter() - start < 1.0


def test_a_pickled_view_larger_than_its_data_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    # One stored float, shown as a [10**6, 8] matrix by zero strides.
    state = {
        "encoder.weight": torch.zeros(1).expand(10**6, 8),
        "encoder.bias": torch.zeros(10**6).as_strided((10**6,), (1,)),
        "decoder.weight": torch.zeros(8, 4),
        "bias": torch.zeros(8),
    }
    torch.save(state, folder / "ae.pt")
    config = {"trainer": {"dict_class": "AutoEncoder", "layer": 1}}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'encoder.weight' of shape \[1000000, 8\] is larger"):
        SAE.from_pretrained(str(tmp_path), "trainer_0")


# ----- activation caches ---------------------------------------------------------------------

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "acts"
    backend = load_model(tiny_gpt2(300), tokenizer=tiny_tokenizer(300))
    write_activation_cache(
        backend, HOOK, list(TINY_TEXTS) * 2, out, 120, context_size=16, model_batch_size=2,
        shard_rows=40,
    )
    return out


def copy_cache(source: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for file in source.iterdir():
        (dest / file.name).write_bytes(file.read_bytes())
    return dest


@pytest.mark.parametrize("bad_name", ["/etc/passwd", "../outside.safetensors", "sub/../x", ""])
def test_progress_naming_a_file_outside_the_cache_is_refused(
    small_cache: Path, tmp_path: Path, bad_name: str
) -> None:
    cache = copy_cache(small_cache, tmp_path / "cache")
    records = json.loads((cache / "progress.json").read_text())
    records[1]["file"] = bad_name
    (cache / "progress.json").write_text(json.dumps(records))
    with pytest.raises(CacheError, match=rf"shard entry .*{bad_name!r}.* not a plain file name"):
        CachedActivations(cache, batch_size=4, buffer_size=8)


def test_an_unfinished_cache_with_a_bad_entry_is_refused_on_resume(
    small_cache: Path, tmp_path: Path
) -> None:
    cache = copy_cache(small_cache, tmp_path / "cache")
    meta = json.loads((cache / "metadata.json").read_text())
    meta["complete"] = False
    (cache / "metadata.json").write_text(json.dumps(meta))
    records = json.loads((cache / "progress.json").read_text())
    records[0]["file"] = str(small_cache / records[0]["file"])  # absolute, though it exists
    (cache / "progress.json").write_text(json.dumps(records))
    backend = load_model(tiny_gpt2(300), tokenizer=tiny_tokenizer(300))
    with pytest.raises(CacheError, match="not a plain file name inside the cache folder"):
        write_activation_cache(
            backend, HOOK, list(TINY_TEXTS) * 2, cache, 120, context_size=16,
            model_batch_size=2, shard_rows=40,
        )
