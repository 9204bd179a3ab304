"""What a downstream evaluation reads: the model and the hook, with activations computed once.

Every eval of a suite, and every SAE that reads the same hook, shares one `EvalData`; the
model's activations for a set of texts (or token batches) are computed the first time an eval
asks for them and served from memory afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saekit.analysis.text import need_tokenizer, pad_token_id
from saekit.data.tokens import keep_mask, sequence_framing, special_token_ids
from saekit.models.backend import ModelBackend
from saekit.progress import bar
from saekit.sites import SAESite, activation_region


@dataclass
class TextActivations:
    """The hook's activations for a list of texts, each cut to `context_size` tokens.

    acts: [n_texts, pos, d] float32 on the CPU (right-padded);
    tokens: [n_texts, pos] token ids;
    mask: [n_texts, pos] True on the text's own tokens (not BOS, EOS or padding)."""

    acts: Tensor
    tokens: Tensor
    mask: Tensor

    def mean_pooled(self, values: Tensor | None = None) -> Tensor:
        """Mean over each text's own tokens of `values` [n, pos, m] (default: the
        activations) -> [n, m]; SAEBench pools this way for its probes."""
        values = self.acts if values is None else values
        weights = self.mask.to(values.dtype).unsqueeze(-1)
        return (values * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@dataclass
class EvalData:
    """The model, the site the SAEs read, and a memo of activations computed for them."""

    backend: ModelBackend
    site: SAESite
    context_size: int = 128
    prepend_bos: bool | None = None
    tokens_per_batch: int = 8192
    """Tokens per model forward pass (sequences per pass: this over their length)."""
    progress: bool | None = None
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def hook(self) -> str:
        return self.site.hook_in

    def token_activations(self, key: Any, tokens: Tensor, position: int | None = None) -> Tensor:
        """The hook's activations [batch, pos, d] (float32, CPU) for token ids [batch, pos],
        computed once per `key` (name the data: the same key must mean the same tokens).

        With `position` only that position of each sequence is kept: [batch, d]. Prompts
        read at one token (probing datasets) then cost d floats each, not pos * d."""
        memo_key = ("tokens", key, position)
        if memo_key not in self._memo:
            self._memo[memo_key] = self._run(tokens, f"activations ({key})", position)
        return self._memo[memo_key]

    def text_activations(self, key: Any, texts: Sequence[str]) -> TextActivations:
        """`TextActivations` for `texts`, computed once per `key`."""
        memo_key = ("texts", key)
        if memo_key not in self._memo:
            tokens, lengths = self._tokenize(texts)
            mask = keep_mask(tokens, special_token_ids(self.backend.tokenizer))
            # Padding may reuse a real token id (GPT-2 pads with EOS): mask by length too.
            positions = torch.arange(tokens.shape[1]).unsqueeze(0)
            mask &= positions < lengths.unsqueeze(1)
            acts = self._run(tokens, f"activations ({key})")
            self._memo[memo_key] = TextActivations(acts, tokens, mask)
        return self._memo[memo_key]

    def _tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(token ids [n, pos] right-padded, each row's length), framed as the SAEs saw text
        and cut to `context_size` tokens, framing included."""
        tokenizer = need_tokenizer(self.backend.tokenizer)
        _, prefix, suffix = sequence_framing(tokenizer, self.prepend_bos)
        room = self.context_size - len(prefix) - len(suffix)
        if room <= 0:
            raise ValueError(f"context_size {self.context_size} leaves no room for text")
        encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        rows = [[*prefix, *ids[:room], *suffix] for ids in encoded]
        width = max(len(row) for row in rows)
        tokens = torch.full((len(rows), width), pad_token_id(tokenizer), dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return tokens, torch.tensor([len(row) for row in rows])

    def memo(self, key: Any, compute: Any) -> Any:
        """Any other shared intermediate (a fitted probe, a dataset): `compute()` once."""
        memo_key = ("other", key)
        if memo_key not in self._memo:
            self._memo[memo_key] = compute()
        return self._memo[memo_key]

    def _run(self, tokens: Tensor, desc: str, position: int | None = None) -> Tensor:
        out: list[Tensor] = []
        shown = bar(desc=desc, unit="seq", total=tokens.shape[0], progress=self.progress)
        with torch.no_grad(), shown:
            rows = max(1, self.tokens_per_batch // max(tokens.shape[1], 1))
            for start in range(0, tokens.shape[0], rows):
                batch = tokens[start : start + rows].to(self.backend.device)
                act = self.backend.activations(batch, [self.hook])[self.hook]
                act = activation_region(act, self.site.head_index)
                if position is not None:
                    act = act[:, position]  # [batch, d]
                out.append(act.float().cpu())
                shown.update(batch.shape[0])
        return torch.cat(out)
