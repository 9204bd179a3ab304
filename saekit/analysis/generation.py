"""Token-by-token generation: greedy or sampled, with temperature, top-k and top-p.

The whole sequence is re-run at each step (no key-value cache): simple, exact with any hooks
or SAEs spliced in, and fast enough for the short continuations analysis needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def next_tokens(
    logits: Tensor,
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The next token of each row from its last-position logits [batch, vocab] -> [batch]:
    the argmax when not sampling (or at temperature 0), else a draw from the softmax of
    logits / temperature, restricted to the top_k tokens and the smallest set whose
    probability reaches top_p."""
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [batch, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        ordered, order = logits.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the tokens before it already reach top_p (the first always stays).
        drop = (cumulative - ordered.softmax(dim=-1)) >= top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_generation(max_new_tokens: int, temperature: float) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")


def sample(
    forward: Callable[[Tensor], Tensor],
    tokens: Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    seed: int | None = None,
) -> Tensor:
    """`tokens` [batch, pos] followed by up to `max_new_tokens` generated ones.

    `forward` maps tokens [batch, pos] to logits [batch, pos, vocab]. With `eos_token_id`, a
    row that produced it is finished (later positions repeat it) and generation stops once
    every row is."""
    check_generation(max_new_tokens, temperature)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    tokens = tokens.cpu()
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = forward(tokens)[:, -1].float().cpu()  # [batch, vocab]
            nxt = next_tokens(
                logits, do_sample=do_sample, temperature=temperature, top_k=top_k,
                top_p=top_p, generator=generator,
            )
            if eos_token_id is not None:
                nxt = nxt.masked_fill(finished, eos_token_id)
                finished |= nxt == eos_token_id
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if eos_token_id is not None and bool(finished.all()):
                break
    return tokens
