"""Train saekit's bundled demo language model: a small GPT-2 on Shakespeare + Milton.

Steps, all deterministic for a given seed and step count:

1. train a byte-level BPE tokenizer on the training split of the bundled corpus;
2. tokenize the training and held-out works, joining works with ``<|endoftext|>``;
3. train ``GPT2LMHeadModel`` on random windows of the training stream, each window starting
   with ``<|endoftext|>`` as BOS (AdamW, linear warm-up then cosine decay);
4. measure the held-out loss (mean next-token cross-entropy, nats) on the held-out works;
5. save weights (safetensors), config, tokenizer and a model card to the output folder.

The run length is a step count, not a timer, so a rerun gives the same model (up to
floating-point nondeterminism across machines / thread counts).

Usage::

    python scripts/train_bundled_model.py                   # full run, writes the bundled model
    python scripts/train_bundled_model.py --steps 30 --out /tmp/probe   # throughput probe
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from saekit.assets.corpus import HELDOUT_WORKS, heldout_works, train_texts, train_works

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "saekit" / "assets" / "bundled_model"
SPECIAL = "<|endoftext|>"


@dataclass
class Settings:
    out: str
    seed: int
    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_ctx: int
    dropout: float
    steps: int
    batch_size: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    eval_every: int
    threads: int


def parse_args() -> Settings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-ctx", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=560)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=100)
    # One thread: on a shared 2-core machine, two OpenMP threads spin-wait on each other and ran
    # at less than half the speed of one (measured: ~190 vs ~500 tokens/s).
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    return Settings(**{k.replace("-", "_"): v for k, v in vars(a).items()})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(vocab_size: int, n_ctx: int, out: Path) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) trained on the training split only."""
    tok = Tokenizer(models.BPE())
    # No prefix space: the corpus is line-oriented text, and GPT-2 does not add one either.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[SPECIAL],
        # All 256 byte symbols, so any UTF-8 text (even unseen characters) is encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL,
        eos_token=SPECIAL,
        unk_token=SPECIAL,
        pad_token=SPECIAL,
        model_max_length=n_ctx,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out)
    _portable_tokenizer_config(out, fast)
    # Reload through AutoTokenizer: that is how users (and load_bundled_tokenizer) get it.
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded.bos_token_id == loaded.eos_token_id == tok.token_to_id(SPECIAL)
    return loaded


def _portable_tokenizer_config(out: Path, fast: PreTrainedTokenizerFast) -> None:
    """Make the saved tokenizer loadable by transformers 4.x as well as 5.x.

    transformers 5 writes ``tokenizer_class: TokenizersBackend``, a name 4.x does not know;
    ``PreTrainedTokenizerFast`` is understood by both. It also writes no special-tokens map,
    which 4.x reads to learn bos/eos.
    """
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    specials = {k: SPECIAL for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def encode_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """Concatenate the works into one token stream, with EOS after each work."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- data


def random_windows(
    stream: torch.Tensor, batch: int, n_ctx: int, bos: int, gen: torch.Generator
) -> torch.Tensor:
    """``batch`` windows of ``n_ctx`` tokens: BOS then ``n_ctx - 1`` tokens from random offsets.

    Random offsets (rather than a fixed chunking) give the model every alignment of the text
    across epochs; EOS tokens between works stay in place, so a window can cross a work boundary.
    """
    body = n_ctx - 1
    starts = torch.randint(0, len(stream) - body, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(body)[None, :]
    bos_col = torch.full((batch, 1), bos, dtype=torch.long)
    return torch.cat([bos_col, stream[idx]], dim=1)


def fixed_windows(stream: torch.Tensor, n_ctx: int, bos: int) -> torch.Tensor:
    """Non-overlapping BOS-prefixed windows covering the stream (the last, short one dropped)."""
    body = n_ctx - 1
    n = len(stream) // body
    chunks = stream[: n * body].view(n, body)
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), chunks], dim=1)


@torch.no_grad()
def mean_loss(model: GPT2LMHeadModel, windows: torch.Tensor, batch: int = 64) -> float:
    """Mean next-token cross-entropy (nats) over every predicted position of ``windows``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch]
        logits = model(x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / count


def unigram_cross_entropy(train: torch.Tensor, heldout: torch.Tensor, vocab: int) -> float:
    """Held-out cross-entropy (nats) of a unigram model fit on the training stream (add-one)."""
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    logp = counts.log() - counts.sum().log()
    return float(-logp[heldout].mean())


# --------------------------------------------------------------------------- training


def lr_at(step: int, s: Settings) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return s.lr * (s.min_lr_ratio + (1.0 - s.min_lr_ratio) * cos)


def make_optimizer(model: GPT2LMHeadModel, s: Settings) -> torch.optim.AdamW:
    # Decay matrices only; biases, LayerNorm gains and position embeddings are left alone.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "wpe" not in name else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": s.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), eps=1e-8)


def main() -> None:
    s = parse_args()
    torch.set_num_threads(s.threads)
    seed_everything(s.seed)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    print(f"settings: {json.dumps(asdict(s))}", flush=True)
    tokenizer = train_tokenizer(s.vocab_size, s.n_ctx, out)
    vocab = len(tokenizer)
    bos = tokenizer.bos_token_id
    print(f"tokenizer: {vocab} tokens, trained in {time.time() - t_start:.1f}s", flush=True)

    train_stream = encode_stream(tokenizer, train_texts())
    held_stream = encode_stream(tokenizer, [t for _, t in heldout_works()])
    held_windows = fixed_windows(held_stream, s.n_ctx, bos)
    # A fixed subset for the periodic evaluations during training, to keep them cheap.
    probe_windows = held_windows[
        torch.randperm(len(held_windows), generator=torch.Generator().manual_seed(s.seed))[:256]
    ]
    unigram = unigram_cross_entropy(train_stream, held_stream, vocab)
    n_train_chars = sum(len(t) for _, t in train_works())
    print(
        f"train: {len(train_stream):,} tokens ({n_train_chars / len(train_stream):.2f} chars/token)"
        f"; held-out: {len(held_stream):,} tokens in {len(held_windows)} windows"
        f"; unigram held-out CE {unigram:.4f} nats",
        flush=True,
    )

    config = GPT2Config(
        vocab_size=vocab,
        n_positions=s.n_ctx,
        n_embd=s.n_embd,
        n_layer=s.n_layer,
        n_head=s.n_head,
        n_inner=4 * s.n_embd,
        activation_function="gelu_new",
        resid_pdrop=s.dropout,
        embd_pdrop=s.dropout,
        attn_pdrop=s.dropout,
        bos_token_id=bos,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)

    opt = make_optimizer(model, s)
    gen = torch.Generator().manual_seed(s.seed)
    tokens_per_step = s.batch_size * s.n_ctx
    history: list[dict[str, float]] = []
    model.train()
    t_train = time.time()
    window_loss, window_t = 0.0, time.time()
    for step in range(s.steps):
        lr = lr_at(step, s)
        for group in opt.param_groups:
            group["lr"] = lr
        x = random_windows(train_stream, s.batch_size, s.n_ctx, bos, gen)
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        window_loss += loss.item()

        done = step + 1
        if done % 50 == 0 or done == s.steps:
            n = 50 if done % 50 == 0 else done % 50
            elapsed = time.time() - window_t
            print(
                f"step {done:6d}/{s.steps} lr {lr:.2e} train loss {window_loss / n:.4f}"
                f" | {n * tokens_per_step / elapsed:,.0f} tok/s",
                flush=True,
            )
            window_loss, window_t = 0.0, time.time()
        if done % s.eval_every == 0 and done != s.steps:
            probe = mean_loss(model, probe_windows)
            history.append({"step": done, "heldout_probe_loss": probe})
            print(f"step {done:6d} held-out probe loss {probe:.4f}", flush=True)
            window_t = time.time()  # keep the evaluation out of the throughput figure

    train_seconds = time.time() - t_train
    heldout_loss = mean_loss(model, held_windows)
    n_tokens = s.steps * tokens_per_step
    print(
        f"trained {s.steps} steps ({n_tokens:,} tokens) in {train_seconds:.0f}s"
        f" = {n_tokens / train_seconds:,.0f} tok/s; held-out loss {heldout_loss:.4f} nats"
        f" (unigram {unigram:.4f})",
        flush=True,
    )

    model.save_pretrained(out, safe_serialization=True)
    results = {
        "settings": {k: v for k, v in asdict(s).items() if k != "out"},
        "n_params": n_params,
        "vocab_size": vocab,
        "train_tokens_in_corpus": len(train_stream),
        "heldout_tokens": len(held_stream),
        "heldout_windows": len(held_windows),
        "heldout_works": list(HELDOUT_WORKS),
        "tokens_per_step": tokens_per_step,
        "train_tokens_seen": n_tokens,
        "epochs": n_tokens / len(train_stream),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "tokens_per_second": round(n_tokens / train_seconds),
        "heldout_loss_nats": round(heldout_loss, 4),
        "unigram_heldout_ce_nats": round(unigram, 4),
        "probe_history": history,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
        f", {s.threads} threads",
    }
    (out / "training_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved to {out}", flush=True)


if __name__ == "__main__":
    main()
