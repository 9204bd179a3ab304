"""SAELens runner configs (LanguageModelSAERunnerConfig as JSON or YAML) given to
`saekit train --config`: each field keeps its SAELens meaning, what saekit cannot honour is
refused by name in one line, and a translated config trains. Also: flags named close to a
real one are answered with it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_world import write_corpus

from saekit import SAE, TrainConfig
from saekit.cli import build_parser, main
from saekit.commands.train import config_from_args, read_train_file
from saekit.models.tiny import tiny_gpt2, tiny_tokenizer
from saekit.training.config import TrainingSection
from saekit.training.saelens_config import (
    FIXED,
    IGNORED,
    SAELensConfigError,
    from_saelens_config,
    is_saelens_config,
)
from saekit.training.schedules import lr_at

HOOK = "blocks.0.hook_resid_pre"


def runner(sae: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """A SAELens 6 runner config as `cfg.to_dict()` writes it, cut to a few fields."""
    return {
        "sae": {"architecture": "standard", "d_in": 32, "d_sae": 64, **(sae or {})},
        "model_name": "gpt2", "hook_name": HOOK, "dataset_path": "some/dataset",
        "training_tokens": 256 * 40, "train_batch_size_tokens": 256, **fields,
    }


def translated(cfg: dict[str, Any]) -> TrainConfig:
    assert is_saelens_config(cfg)
    return TrainConfig.from_dict(from_saelens_config(cfg))


# Each case: SAELens fields (runner, then SAE), and (saekit setting, value) that must follow.
CASES: list[tuple[dict[str, Any], dict[str, Any], str, Any]] = [
    ({"model_name": "EleutherAI/pythia-70m"}, {}, "data.model", "EleutherAI/pythia-70m"),
    ({"hook_name": "blocks.3.hook_mlp_out"}, {}, "data.hook_name", "blocks.3.hook_mlp_out"),
    ({"dataset_path": "a/b"}, {}, "data.dataset", "a/b"),
    ({"context_size": 64}, {}, "data.context_size", 64),
    ({"prepend_bos": False}, {}, "data.prepend_bos", False),
    ({"model_class_name": "HookedTransformer"}, {}, "data.backend", "transformer_lens"),
    ({"model_class_name": "AutoModelForCausalLM"}, {}, "data.backend", "hf"),
    ({"eval_dataset_path": "c/d", "eval_dataset_split": "test"}, {}, "data.eval_split", "test"),
    ({"training_tokens": 256 * 50}, {}, "training.tokens", 256 * 50),
    ({"train_batch_size_tokens": 512}, {}, "training.batch_size", 512),
    ({"lr": 4e-4}, {}, "training.lr", 4e-4),
    # Step counts become token counts: steps x train_batch_size_tokens (256 here).
    ({"lr_warm_up_steps": 10}, {}, "training.lr_warmup_tokens", 2560),
    ({}, {"l1_warm_up_steps": 5}, "training.sparsity_warmup_tokens", 1280),
    ({"dead_feature_window": 7}, {}, "training.dead_after_tokens", 7 * 256),
    ({}, {"l1_coefficient": 2.5}, "training.sparsity_coefficient", 2.5),
    ({}, {"architecture": "jumprelu", "l0_coefficient": 0.3}, "training.sparsity_coefficient",
     0.3),
    ({}, {"architecture": "jumprelu", "jumprelu_bandwidth": 0.05},
     "training.threshold_bandwidth", 0.05),
    ({}, {"architecture": "jumprelu", "jumprelu_sparsity_loss_mode": "tanh"},
     "training.threshold_penalty", "tanh"),
    ({}, {"architecture": "TopK", "k": 16}, "sae.k", 16),
    ({}, {"architecture": "batchtopk", "k": 16.0}, "sae.k", 16),
    ({}, {"architecture": "topk", "k": 8, "aux_loss_coefficient": 0.5},
     "training.aux_k_coefficient", 0.5),
    ({}, {"architecture": "topk", "k": 8, "rescale_acts_by_decoder_norm": False},
     "training.decoder_norm", "free"),
    ({}, {"architecture": "topk", "k": 8, "rescale_acts_by_decoder_norm": True},
     "training.decoder_norm", "auto"),  # unit rows, on which rescaling is the identity
    ({}, {"architecture": "matryoshka_batchtopk", "k": 8, "matryoshka_widths": [16, 32]},
     "sae.matryoshka_widths", [16, 32, 64]),  # SAELens adds d_sae as the last level
    ({}, {"d_sae": 96}, "sae.d_sae", 96),
    ({}, {"apply_b_dec_to_input": False}, "sae.apply_b_dec_to_input", False),
    ({}, {"normalize_activations": "expected_average_only_in"}, "sae.norm_scaling", True),
    ({}, {"normalize_activations": "none"}, "sae.norm_scaling", False),
    ({"seed": 7}, {}, "run.seed", 7),
    ({"device": "cpu"}, {}, "run.device", "cpu"),
    ({"llm_device": "cpu"}, {}, "run.model_device", "cpu"),
    ({"dtype": "torch.bfloat16"}, {}, "run.dtype", "bfloat16"),
    ({"output_path": "out/sae"}, {}, "run.out", "out/sae"),
    ({"logger": {"log_to_wandb": False, "wandb_project": "p", "wandb_log_frequency": 5}},
     {}, "run.log_every", 5),
    ({"logger": {"log_to_wandb": False, "wandb_project": "p"}}, {}, "run.wandb_project", "p"),
    # The flat layout of SAELens 5: a topk SAE is a standard one with activation_fn topk.
    ({"architecture": "standard", "activation_fn": "topk", "activation_fn_kwargs": {"k": 12},
      "expansion_factor": 4}, {}, "sae.k", 12),
]


@pytest.mark.parametrize(("fields", "sae", "setting", "expected"), CASES)
def test_each_field_translates_to_the_setting_of_the_same_meaning(
    fields: dict[str, Any], sae: dict[str, Any], setting: str, expected: Any
) -> None:
    cfg = runner(sae, **fields)
    if "architecture" in fields:  # the flat layout has no sae section
        cfg.pop("sae")
    section, name = setting.split(".")
    assert getattr(getattr(translated(cfg), section), name) == expected


def test_constant_schedule_with_decay_steps_is_saelens_schedule() -> None:
    """SAELens: constant lr, then linear to zero over the last lr_decay_steps steps."""
    steps, decay, lr = 40, 10, 1e-3
    cfg = translated(runner(lr=lr, lr_decay_steps=decay, lr_scheduler_name="constant"))
    for step in range(steps):
        saelens = lr if step < steps - decay else lr * (steps - step) / decay
        assert lr_at(cfg.training, step * 256) == pytest.approx(saelens)


def test_cosine_schedule_with_lr_end_zero_is_saelens_schedule() -> None:
    steps, lr = 40, 1e-3
    cfg = translated(runner(lr=lr, lr_scheduler_name="cosineannealing", lr_end=0.0))
    assert cfg.training.lr_schedule == "cosine"
    for step in range(steps):
        saelens = lr * 0.5 * (1 + math.cos(math.pi * step / steps))  # CosineAnnealingLR
        assert lr_at(cfg.training, step * 256) == pytest.approx(saelens)


def test_checkpoints_are_spaced_as_saelens_spaces_them() -> None:
    cfg = translated(runner(n_checkpoints=3))
    assert cfg.run.checkpoint_every == math.ceil(256 * 40 / 4) and cfg.run.keep_checkpoints == 3


def saelens6_dump(out: str, model: str, dataset: str) -> dict[str, Any]:
    """Every field `LanguageModelSAERunnerConfig(...).to_dict()` writes (SAELens 6), at its
    default unless set for a tiny run."""
    return {
        "sae": {
            "d_in": 32, "d_sae": 64, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none",
            "reshape_activations": "none", "metadata": {"sae_lens_version": "6.5.0"},
            "decoder_init_norm": 0.1, "k": 8, "use_sparse_activations": False,
            "aux_loss_coefficient": 1.0, "rescale_acts_by_decoder_norm": True,
            "architecture": "topk",
        },
        "model_name": model, "model_class_name": "AutoModelForCausalLM", "hook_name": HOOK,
        "hook_eval": "NOT_IN_USE", "hook_head_index": None, "dataset_path": dataset,
        "dataset_trust_remote_code": True, "streaming": True, "is_dataset_tokenized": False,
        "use_chat_formatting": False, "context_size": 64, "use_cached_activations": False,
        "cached_activations_path": None, "from_pretrained_path": None,
        "n_batches_in_buffer": 20, "training_tokens": 1024, "store_batch_size_prompts": 32,
        "seqpos_slice": [None], "disable_concat_sequences": False,
        "sequence_separator_token": "bos", "activations_mixing_fraction": 0.5,
        "device": "cpu", "llm_device": "cpu", "act_store_device": "cpu",
        "prefetch_llm_batches": False, "seed": 42, "dtype": "float32", "prepend_bos": True,
        "autocast": False, "autocast_lm": False, "compile_llm": False,
        "llm_compilation_mode": None, "compile_sae": False, "sae_compilation_mode": None,
        "train_batch_size_tokens": 256, "adam_beta1": 0.9, "adam_beta2": 0.999, "lr": 3e-4,
        "lr_scheduler_name": "constant", "lr_warm_up_steps": 0, "lr_end": 3e-5,
        "lr_decay_steps": 0, "n_restart_cycles": 1, "dead_feature_window": 1000,
        "feature_sampling_window": 2000, "dead_feature_threshold": 1e-8,
        "n_eval_batches": 10, "eval_batch_size_prompts": None,
        "logger": {
            "log_to_wandb": False, "log_activations_store_to_wandb": False,
            "log_optimizer_state_to_wandb": False, "log_weights_to_wandb": True,
            "wandb_project": "sae_lens_training", "wandb_id": None, "run_name": "topk-64",
            "wandb_entity": None, "wandb_log_frequency": 10, "eval_every_n_wandb_logs": 100,
        },
        "n_checkpoints": 1, "checkpoint_path": "checkpoints/0a1b2c3d",
        "save_final_checkpoint": False, "output_path": out, "resume_from_checkpoint": None,
        "verbose": True, "model_kwargs": {},
        "model_from_pretrained_kwargs": {"center_writing_weights": False},
        "sae_lens_version": "6.5.0", "sae_lens_training_version": "6.5.0",
        "exclude_special_tokens": False, "n_batches_for_norm_estimate": 1000,
        "eval_dataset_path": None, "eval_dataset_split": "train",
        "eval_dataset_trust_remote_code": False,
    }


def test_a_saelens_config_trains_from_the_command_line(
    tmp_path: Path, one_thread: None, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    tiny_gpt2(300).save_pretrained(model)
    tiny_tokenizer(300).save_pretrained(model)
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    config = tmp_path / "saelens_cfg.json"
    config.write_text(json.dumps(saelens6_dump(str(out), str(model), str(corpus))))
    code = main(["train", "--config", str(config), "--eval-tokens", "256", "--no-report",
                 "--no-progress", "-q"])
    assert code == 0, capsys.readouterr().err
    sae = SAE.load(out)
    assert (sae.cfg.architecture, sae.cfg.d_sae, sae.cfg.k) == ("topk", 64, 8)
    assert sae.cfg.metadata.hook_name == HOOK and sae.cfg.metadata.context_size == 64
    saved = TrainConfig.load(out / "run_config.yaml")
    assert saved.training.lr == 3e-4 and saved.training.aux_k_coefficient == 1.0
    assert saved.training.dead_after_tokens == 1000 * 256 and saved.run.seed == 42
    assert saved.run.checkpoint_every == 512 and saved.run.keep_checkpoints == 1
    # The same config as YAML reads the same.
    as_yaml = tmp_path / "saelens_cfg.yaml"
    as_yaml.write_text(yaml.safe_dump(saelens6_dump(str(out), str(model), str(corpus))))
    assert read_train_file(as_yaml) == read_train_file(config)


def test_refused_fields_are_named_in_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = runner({"jumprelu_tanh_scale": 2.0}, adam_beta1=0.8, seqpos_slice=[1, None],
                 use_ghost_grads=True)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("saekit: error: ")
    for text in ("sae.jumprelu_tanh_scale=2.0", "adam_beta1=0.8", "seqpos_slice=[1, null]",
                 "use_ghost_grads=true"):
        assert text in err, err
    with pytest.raises(SAELensConfigError) as info:
        from_saelens_config(cfg)
    assert info.value.fields == [
        "sae.jumprelu_tanh_scale", "adam_beta1", "seqpos_slice", "use_ghost_grads"
    ]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"lr_scheduler_name": "cosineannealing"}, "lr_end=null"),  # SAELens ends at lr / 10
        ({"lr_scheduler_name": "cosineannealingwarmrestarts"}, "lr_scheduler_name"),
        ({"model_class_name": "HookedMamba"}, "model_class_name"),
        ({"hook_head_index": 3}, "hook_head_index=3"),
        ({"use_cached_activations": True}, "use_cached_activations=true"),
        ({"from_pretrained_path": "x"}, "from_pretrained_path"),
        ({"sae": {"architecture": "jumprelu", "d_sae": 64, "pre_act_loss_coefficient": 3e-6}},
         "sae.pre_act_loss_coefficient"),
        ({"sae": {"architecture": "standard", "d_sae": 64, "normalize_activations": "layer_norm"}},
         "sae.normalize_activations"),
        ({"sae": {"architecture": "standard", "d_sae": 64, "decoder_init_norm": 0.5}},
         "sae.decoder_init_norm"),
    ],
)
def test_what_saekit_cannot_honour_is_refused_by_name(fields: dict[str, Any], named: str) -> None:
    cfg = runner(**fields)
    with pytest.raises(SAELensConfigError, match=named.replace("[", r"\[")):
        from_saelens_config(cfg)


def test_ignored_and_default_fields_are_accepted() -> None:
    cfg = runner(**{name: "anything" for name in IGNORED})
    for name, (accepted, _) in FIXED.items():
        cfg[name] = list(accepted[0]) if isinstance(accepted[0], tuple) else accepted[0]
    base = translated(runner())
    assert translated(cfg) == base
    assert base.training.lr == TrainingSection().lr  # absent fields take saekit's defaults


def test_saekit_configs_are_not_taken_for_saelens_ones() -> None:
    assert not is_saelens_config({"sae": {"architecture": "topk"}, "training": {"lr": 1e-3}})
    assert not is_saelens_config({"sae": {}, "dat": {}})  # a typo: saekit reports it


def test_an_unknown_flag_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--trainng-tokens", "5"]) == 2
    assert capsys.readouterr().err == (
        "saekit: error: unknown flag --trainng-tokens; did you mean --training-tokens?\n"
    )
    assert main(["eval", "x", "--modle-batch-size", "3"]) == 2
    assert "did you mean --model-batch-size?" in capsys.readouterr().err
    assert main(["train", "--qqqqqq"]) == 2
    assert "saekit train --help lists them" in capsys.readouterr().err


def test_saelens_flag_names_reach_their_settings() -> None:
    args = build_parser().parse_args(
        ["train", "--d-sae", "96", "--context-size", "32", "--training-tokens", "1024",
         "--train-batch-size-tokens", "256", "--l1-coefficient", "2", "--hook-name", HOOK]
    )
    assert vars(args)["sae.d_sae"] == "96" and vars(args)["data.context_size"] == "32"
    assert vars(args)["training.tokens"] == "1024"
    assert vars(args)["training.batch_size"] == "256"
    assert vars(args)["training.sparsity_coefficient"] == "2"
    # --hook-name takes several names; one stays one hook in the config.
    assert vars(args)["data.hook_name"] == [HOOK]
    assert config_from_args(args).data.hook_name == HOOK
