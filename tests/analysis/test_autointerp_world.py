"""A synthetic world for the auto-interpretation tests, and an oracle that answers from it.

Tokens are ` t00` .. ` t19`; four latents follow known rules:
  0 fires on every t07 (1.0 to 1.5);
  1 fires on t09 only right after t03 (1.0 to 1.5);
  2 fires on t11 (1.0 to 1.5) and, weakly, on every t12 (0.5);
  3 never fires.
The statistics come from the real accumulator over random sequences; the non-activating
windows are cut here, by hand, from other random sequences. Other test files import this
module (pytest puts this folder on the path); the tests below check the world itself.
"""

from __future__ import annotations

import re
from collections import Counter

import torch
from torch import Tensor

from saekit.analysis.stats import FeatureStats, FeatureStatsAccumulator
from saekit.autointerp import NegativePool, mapping_decoder

VOCAB = 20
D_SAE = 4
LEFT, RIGHT = 12, 4
WIDTH = LEFT + 1 + RIGHT
PIECES = {i: f" t{i:02d}" for i in range(VOCAB)}
decode = mapping_decoder(PIECES)


def random_tokens(n_seq: int, seq_len: int, seed: int) -> Tensor:
    return torch.randint(0, VOCAB, (n_seq, seq_len), generator=torch.Generator().manual_seed(seed))


def world_latents(tokens: Tensor) -> Tensor:
    """[batch, pos, 4] activations by the rules in the module docstring."""
    pos = torch.arange(tokens.shape[1])
    vary = 1.0 + 0.05 * ((tokens * 7 + pos * 13) % 11).float()  # 1.0 .. 1.5
    prev = torch.cat([torch.full_like(tokens[:, :1], -1), tokens[:, :-1]], dim=1)
    return torch.stack([
        (tokens == 7) * vary,
        ((tokens == 9) & (prev == 3)) * vary,
        (tokens == 11) * vary + (tokens == 12) * 0.5,
        torch.zeros(tokens.shape),
    ], dim=-1).float()


def world_stats(n_seq: int = 256, seq_len: int = 64, seed: int = 0) -> FeatureStats:
    tokens = random_tokens(n_seq, seq_len, seed)
    acc = FeatureStatsAccumulator(D_SAE, top_k=20, n_samples=40, left=LEFT, right=RIGHT)
    acc.update(tokens, world_latents(tokens))
    return acc.result()


def world_negatives(n_seq: int = 24, seq_len: int = 68, seed: int = 1) -> NegativePool:
    """Windows side by side from other sequences, and which latents fire in each (judged
    on the whole sequence, so that latent 1 sees the token before a window)."""
    tokens = random_tokens(n_seq, seq_len, seed)
    latents = world_latents(tokens)
    windows, fires = [], []
    for row in range(n_seq):
        for start in range(0, seq_len - WIDTH + 1, WIDTH):
            windows.append(tokens[row, start:start + WIDTH])
            fires.append((latents[row, start:start + WIDTH] > 0).any(dim=0))
    return NegativePool(torch.stack(windows), torch.stack(fires))


# ----- the oracle: answers derived from the world, never from a model ------------------------

_PIECE = re.compile(r" t\d\d")
_EXCERPT = re.compile(r"^(\d+)\. (.*)$")


def excerpts(messages: list[dict[str, str]]) -> list[str]:
    return [m.group(2) for line in messages[-1]["content"].splitlines()
            if (m := _EXCERPT.match(line))]


def marked_pieces(text: str) -> list[str]:
    return [p for span in re.findall(r"<<(.*?)>>", text) for p in _PIECE.findall(span)]


def oracle(messages: list[dict[str, str]]) -> str:
    """Explainer: names the token marked most often. Detection: 1 where that token appears.
    Fuzzing: 1 where every marked token is that token."""
    system, user = messages[0]["content"], messages[-1]["content"]
    if "Explanation: <your sentence>" in system:
        counts = Counter(p for text in excerpts(messages) for p in marked_pieces(text))
        return f'Thinking...\nExplanation: the token "{counts.most_common(1)[0][0]}"'
    top = re.search(r'Description: the token "( t\d\d)"', user).group(1)
    if "marked <<like this>>" in system:  # fuzzing
        labels = [int(all(p == top for p in marked_pieces(t))) for t in excerpts(messages)]
    else:
        labels = [int(top in _PIECE.findall(t)) for t in excerpts(messages)]
    return "[" + ", ".join(map(str, labels)) + "]"


# ----- the world's own checks ----------------------------------------------------------------


def test_world_follows_its_rules():
    stats = world_stats()
    assert stats.fire_count[3] == 0 and all(stats.fire_count[i] > 20 for i in range(3))
    for act, tokens, acts in stats.top_examples(0):
        assert tokens[LEFT] == 7 and acts[LEFT] == act
    for _, tokens, _ in stats.top_examples(1):
        assert tokens[LEFT] == 9 and tokens[LEFT - 1] == 3
    pool = world_negatives()
    assert pool.tokens.shape[1] == WIDTH
    # Latent 0 fires in a window exactly when t07 is in it.
    assert torch.equal(pool.fires[:, 0], (pool.tokens == 7).any(dim=1))


def test_oracle_reads_marks():
    prompt = [{"role": "system", "content": "... marked <<like this>> ..."},
              {"role": "user", "content": 'Description: the token " t07"\n\nExcerpts:\n'
                                          "1.  t01<< t07>> t02\n2. << t03>> t07\n3.  t07 t07"}]
    assert oracle(prompt) == "[1, 0, 1]"
    prompt[0]["content"] = "detection"
    assert oracle(prompt) == "[1, 1, 1]"
