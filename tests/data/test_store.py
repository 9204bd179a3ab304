"""The activation store against direct model runs on the same token windows."""

from __future__ import annotations

import io
import math

import pytest
import torch

from saekit.data.store import ActivationStore
from saekit.data.tokens import TokenWindows, keep_mask
from saekit.models import load_model
from saekit.models.tiny import TINY_TEXTS, tiny_gpt2, tiny_hooked_transformer, tiny_tokenizer

DOCS = list(TINY_TEXTS) * 2
HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(300)


@pytest.fixture(scope="module")
def backend(tok):
    return load_model(tiny_gpt2(300), tokenizer=tok)


def all_windows(tok, ctx: int = 16) -> torch.Tensor:
    return torch.stack(list(TokenWindows(DOCS, tok, ctx)))


def direct_rows(backend, tok, exclude: bool) -> torch.Tensor:
    """Rows by hand: hidden state entering block 1, special-token positions dropped."""
    tokens = all_windows(tok)
    with torch.no_grad():
        hidden = backend.model(tokens, output_hidden_states=True).hidden_states[1]
    if exclude:
        return hidden[keep_mask(tokens, {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id})]
    return hidden.flatten(0, 1)


def make(backend, **kwargs) -> ActivationStore:
    options = {"context_size": 16, "batch_size": 8, "buffer_size": 64, "model_batch_size": 3}
    options.update(kwargs)
    return ActivationStore(backend, options.pop("hooks", HOOK), DOCS, **options)


def test_unshuffled_rows_are_the_model_activations_in_order(backend, tok) -> None:
    store = make(backend, shuffle=False, exclude_special_tokens=False)
    rows = torch.cat(list(store))
    expected = direct_rows(backend, tok, exclude=False)
    n = expected.shape[0] // 8 * 8  # the last partial batch is dropped
    torch.testing.assert_close(rows, expected[:n])
    assert store.d_in == 32


def test_special_tokens_are_excluded(backend, tok) -> None:
    rows = torch.cat(list(make(backend, batch_size=1, shuffle=False)))
    torch.testing.assert_close(rows, direct_rows(backend, tok, exclude=True))


def test_shuffled_rows_are_a_permutation(backend, tok) -> None:
    rows = torch.cat(list(make(backend, batch_size=1, seed=3)))
    expected = direct_rows(backend, tok, exclude=True)
    assert rows.shape == expected.shape
    assert not torch.allclose(rows, expected)
    # The same multiset of rows: sort both by a random projection and compare.
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        rows[(rows @ direction).argsort()], expected[(expected @ direction).argsort()]
    )


def test_batches_mix_sequences(backend) -> None:
    batch = next(iter(make(backend, batch_size=16, buffer_size=256, seed=0)))
    plain = next(iter(make(backend, batch_size=16, buffer_size=256, shuffle=False)))
    assert batch.shape == plain.shape == (16, 32)
    assert not torch.allclose(batch, plain)


def test_several_hooks_share_tokens(backend) -> None:
    store = make(backend, hooks=["blocks.0.hook_resid_post", HOOK, "transformer.h.1.output"])
    assert store.d_in == {"blocks.0.hook_resid_post": 32, HOOK: 32, "transformer.h.1.output": 32}
    for batch in list(store)[:5]:
        assert set(batch) == {"blocks.0.hook_resid_post", HOOK, "transformer.h.1.output"}
        # Block 0's output is block 1's input: the same token rows in the same order.
        torch.testing.assert_close(batch["blocks.0.hook_resid_post"], batch[HOOK])
        assert not torch.allclose(batch[HOOK], batch["transformer.h.1.output"])


def test_configuration_is_checked_before_any_work(backend) -> None:
    with pytest.raises(ValueError, match="buffer_size=8 cannot hold one batch of batch_size=16"):
        make(backend, batch_size=16, buffer_size=8)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        make(backend, batch_size=0)
    with pytest.raises(ValueError, match="closest valid hook names: blocks.1.hook_resid_pre"):
        make(backend, hooks="blocks.1.hook_resid_pr")


@pytest.mark.parametrize("taken", [0, 11])
def test_state_dict_restores_the_exact_position(backend, taken: int) -> None:
    reference = make(backend, seed=7)
    for _ in range(taken):
        next(reference)
    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = make(backend, seed=123)  # the seed comes from the state
    restored.load_state_dict(state)
    rest_reference = list(reference)
    rest_restored = list(restored)
    assert len(rest_reference) == len(rest_restored) > 0
    for a, b in zip(rest_reference, rest_restored, strict=True):
        torch.testing.assert_close(a, b)
    assert restored.batches_served == reference.batches_served


def test_state_from_another_configuration_is_refused(backend) -> None:
    state = make(backend).state_dict()
    with pytest.raises(ValueError, match="batch_size: saved 8, now 4"):
        make(backend, batch_size=4).load_state_dict(state)


def test_norm_scaling_factor_matches_hand_computation(backend, tok) -> None:
    store = make(backend, shuffle=False, model_batch_size=4)
    factor = store.estimate_norm_scaling_factor(n_batches=4)
    # 4 batches of 8 rows: the estimate reads whole forward passes until >= 32 rows.
    rows = direct_rows(backend, tok, exclude=True)
    windows = all_windows(tok)
    kept = keep_mask(windows, {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id})
    n_rows = int(kept[:4].sum())
    assert n_rows >= 32
    expected = math.sqrt(32) / rows[:n_rows].norm(dim=-1).mean().item()
    assert factor == pytest.approx(expected, rel=1e-5)
    # The estimate leaves the position where it was.
    torch.testing.assert_close(next(store), next(make(backend, shuffle=False, model_batch_size=4)))
    scaled = rows * expected
    assert scaled[:n_rows].norm(dim=-1).mean().item() == pytest.approx(math.sqrt(32), rel=1e-5)


def test_head_index_reads_one_head(tok) -> None:
    hooked = load_model(tiny_hooked_transformer(300, tokenizer=tok))
    windows = TokenWindows(DOCS, tok, 16)
    store = ActivationStore(
        hooked, "blocks.0.attn.hook_z", windows, batch_size=4, buffer_size=16,
        model_batch_size=2, hook_head_index=1, shuffle=False, exclude_special_tokens=False,
    )
    assert store.d_in == 16
    first = torch.cat([next(store) for _ in range(8)])  # the first 2 windows, 32 rows
    tokens = all_windows(tok)[:2]
    _, cache = hooked.model.run_with_cache(tokens)
    torch.testing.assert_close(first, cache["blocks.0.attn.hook_z"][:, :, 1].flatten(0, 1))
    flat = ActivationStore(hooked, "blocks.0.attn.hook_z", DOCS, context_size=16, batch_size=4,
                           buffer_size=16, model_batch_size=2)
    assert flat.d_in == 32
    assert next(flat).shape == (4, 32)


def test_dtype_and_device_options(backend) -> None:
    batch = next(make(backend, dtype="bfloat16", device="cpu"))
    assert batch.dtype == torch.bfloat16 and batch.device.type == "cpu"
