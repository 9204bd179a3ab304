"""Explain and score latents from statistics already gathered: plan, then run, resumably.

For each latent: one explainer call on its training contexts, then the detection and
fuzzing calls on its test contexts (`examples_per_prompt` excerpts a call). Each finished
latent is appended to `explanations.jsonl` in the run folder; every answer is kept in
`autointerp_answers.jsonl` as it arrives (see cache.py), so a run stopped at any point goes
on where it stopped without paying for an answer twice. `autointerp.json` records the
settings and models, and a rerun with others is refused rather than mixed in.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saekit.analysis.explanations import (
    EXPLANATIONS_FILE,
    Explanation,
    append_explanations,
    read_explanations,
)
from saekit.analysis.stats import FeatureStats
from saekit.autointerp.cache import AnswerCache, call_key, drop_torn_tail
from saekit.autointerp.clients import ChatClient, Messages, make_client
from saekit.autointerp.config import PROMPT_VERSION, AutointerpConfig
from saekit.autointerp.contexts import Context, ContextSplit, split_contexts
from saekit.autointerp.negatives import NegativePool
from saekit.autointerp.prompts import (
    Decoder,
    TokenText,
    explainer_messages,
    parse_explanation,
    parse_labels,
    scorer_messages,
)
from saekit.autointerp.scoring import (
    Sample,
    classification_scores,
    detection_samples,
    fuzzing_samples,
    in_prompts,
)
from saekit.autointerp.selection import LatentSelection, parse_latents

logger = logging.getLogger(__name__)

SETTINGS_FILE = "autointerp.json"
#: Characters per token when no tokenizer of the model is at hand (English prose with BPE).
CHARS_PER_TOKEN = 4
#: Stands for an explanation not made yet when counting the scorers' prompt tokens.
TYPICAL_EXPLANATION = "the token x in a particular kind of context, word or phrase, or topic"
#: Tokens a chat format adds per message (role markers and separators), roughly.
TOKENS_PER_MESSAGE = 4


@dataclass
class Job:
    """One latent's inputs: its contexts and its non-activating contexts."""

    latent: int
    split: ContextSplit
    negatives: list[Context]
    max_act: float


@dataclass
class Plan:
    """What a run will do, known before any call is made."""

    todo: list[int]
    """Latents to explain and score."""
    done: list[int]
    """Requested latents already explained in the run folder (skipped)."""
    rare: list[int]
    """Requested latents with too few activating contexts (skipped)."""
    calls: int
    """Calls that will be sent (answers already cached are not counted)."""
    prompt_tokens: int
    """Prompt tokens those calls send (estimated where the model's tokenizer is unknown, and
    for scorer prompts whose explanation is not made yet)."""
    completion_tokens: int
    """The most completion tokens those calls may ask for."""
    first_prompt: Messages | None
    """The first explainer prompt of the run (None when nothing is left to do)."""
    unscored: list[int] = field(default_factory=list)
    """Latents to explain that no scorer can test: too few contexts held out, or no
    non-activating context (a latent that fires in every window gathered)."""

    def summary(self) -> str:
        skipped = []
        if self.done:
            skipped.append(f"{len(self.done)} already explained")
        if self.rare:
            skipped.append(f"{len(self.rare)} with too few activating contexts")
        rest = f" ({', '.join(skipped)})" if skipped else ""
        if self.unscored:
            rest += (f"; {len(self.unscored)} of them cannot be scored (too few held-out or "
                     "non-activating contexts)")
        return (
            f"{len(self.todo)} latents to explain{rest}: {self.calls:,} calls, about "
            f"{self.prompt_tokens:,} prompt tokens and at most {self.completion_tokens:,} "
            "completion tokens"
        )


@dataclass
class AutointerpResult:
    """What `explain_latents` did."""

    explanations: dict[int, Explanation]
    """Every requested latent's explanation in the run folder (old and new)."""
    path: Path
    """The explanations file."""
    plan: Plan
    sent: int = 0
    """Calls sent in this run (the rest were answered from the cache)."""
    new: list[int] = field(default_factory=list)
    """Latents explained in this run."""


def format_messages(messages: Messages) -> str:
    """A prompt as text, for --dry-run and logs."""
    return "\n\n".join(f"--- {m['role']} ---\n{m['content']}" for m in messages)


def _count(client: ChatClient, messages: Messages) -> int:
    count = getattr(client, "count_tokens", None)
    total = 0
    for m in messages:
        text = m["content"]
        total += (count(text) if callable(count) else math.ceil(len(text) / CHARS_PER_TOKEN))
        total += TOKENS_PER_MESSAGE
    return total


def scorer_calls(
    job: Job, explanation: str, decode: Decoder, cfg: AutointerpConfig
) -> list[tuple[str, list[Sample], list[Messages]]]:
    """(scorer, samples in the order shown, prompts) for each scorer a latent can have: none
    without an explanation or test contexts; detection needs non-activating contexts, and
    fuzzing in `inactive` mode too."""
    if not explanation or not job.split.test:
        return []
    out = []
    for name in ("detection", "fuzzing"):
        rng = random.Random(f"{name}:{cfg.seed}:{job.latent}")
        if name == "detection":
            samples = detection_samples(job.split.test, job.negatives, decode)
        else:
            samples = fuzzing_samples(job.split.test, job.negatives, decode, cfg, rng)
        if all(s.activating for s in samples):
            continue  # nothing to tell apart: no score is better than a one-class one
        rng.shuffle(samples)
        groups = in_prompts(samples, cfg.examples_per_prompt)
        prompts = [scorer_messages(name, explanation, [s.text for s in g]) for g in groups]
        out.append((name, samples, prompts))
    return out


class Runner:
    """Explains and scores jobs, asking through the answer cache."""

    def __init__(
        self,
        explainer: ChatClient,
        scorer: ChatClient,
        decode: Decoder,
        cfg: AutointerpConfig,
        cache: AnswerCache,
    ) -> None:
        self.explainer, self.scorer, self.decode, self.cfg = explainer, scorer, decode, cfg
        self.cache = cache

    def explainer_prompt(self, job: Job) -> Messages:
        return explainer_messages(job.split, self.decode, self.cfg.mark_threshold, job.max_act)

    def _explainer_key(self, job: Job) -> str:
        return call_key(self.explainer.name, self.explainer_prompt(job),
                        self.cfg.max_explanation_tokens, self.cfg.temperature)

    def _scorer_key(self, prompt: Messages) -> str:
        return call_key(self.scorer.name, prompt, self.cfg.max_label_tokens, self.cfg.temperature)

    def scorable(self, job: Job) -> bool:
        return bool(scorer_calls(job, TYPICAL_EXPLANATION, self.decode, self.cfg))

    def cost(self, job: Job) -> tuple[int, int, int]:
        """(calls, prompt tokens, completion tokens) this job still has to send."""
        calls = tokens = completion = 0
        prompt = self.explainer_prompt(job)
        key = self._explainer_key(job)
        if key in self.cache:
            explanation = parse_explanation(self.cache.answers[key])
        else:
            calls, tokens = 1, _count(self.explainer, prompt)
            completion = self.cfg.max_explanation_tokens
            explanation = TYPICAL_EXPLANATION
        for _, _, prompts in scorer_calls(job, explanation, self.decode, self.cfg):
            for p in prompts:
                if self._scorer_key(p) not in self.cache:
                    calls += 1
                    tokens += _count(self.scorer, p)
                    completion += self.cfg.max_label_tokens
        return calls, tokens, completion

    def run(self, job: Job) -> Explanation:
        cfg = self.cfg
        answer = self.cache.ask(
            self.explainer, self.explainer_prompt(job),
            max_tokens=cfg.max_explanation_tokens, temperature=cfg.temperature,
        )
        explanation = parse_explanation(answer)
        scores: dict[str, dict[str, float]] = {}
        for name, samples, prompts in scorer_calls(job, explanation, self.decode, cfg):
            predicted: list[bool | None] = []
            groups = in_prompts(samples, cfg.examples_per_prompt)
            for prompt, group in zip(prompts, groups, strict=True):
                reply = self.cache.ask(
                    self.scorer, prompt, max_tokens=cfg.max_label_tokens,
                    temperature=cfg.temperature,
                )
                labels = parse_labels(reply, len(group))
                predicted.extend(labels if labels is not None else [None] * len(group))
            result = classification_scores([s.activating for s in samples], predicted)
            scores[name] = {k: v for k, v in result.items() if math.isfinite(v)}
        return Explanation(
            latent=job.latent, explanation=explanation, scores=scores,
            explainer_model=self.explainer.name, scorer_model=self.scorer.name,
            prompt_version=PROMPT_VERSION,
        )


def _settings(cfg: AutointerpConfig, explainer: ChatClient, scorer: ChatClient) -> dict:
    return {
        "config": json.loads(cfg.to_json()), "explainer_model": explainer.name,
        "scorer_model": scorer.name,
    }


def _check_folder(
    out: Path, settings: dict, latents: Sequence[int], replace: bool
) -> dict[int, Explanation]:
    """The explanations already in `out`; refuses a folder whose earlier run used other
    settings or models, unless `replace`."""
    path = out / SETTINGS_FILE
    if path.is_file() and not replace:
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"{path} is not readable JSON ({err}); delete it") from err
        if before != settings:
            changed = sorted(
                k for k in set(before.get("config", {})) | set(settings["config"])
                if before.get("config", {}).get(k) != settings["config"].get(k)
            ) + [k for k in ("explainer_model", "scorer_model") if before.get(k) != settings[k]]
            raise ValueError(
                f"{out} holds an auto-interpretation run with other settings or models "
                f"({', '.join(changed)} differ); use the same ones to go on with it, another "
                "--out, or --replace to explain the latents again under the new ones"
            )
    existing = read_explanations(out)
    if not replace:
        foreign = [
            i for i in latents if i in existing and (
                existing[i].explainer_model != settings["explainer_model"]
                or existing[i].scorer_model != settings["scorer_model"]
                or existing[i].prompt_version != PROMPT_VERSION
            )
        ]
        if foreign:
            e = existing[foreign[0]]
            raise ValueError(
                f"{out / EXPLANATIONS_FILE} already explains {len(foreign)} of these latents "
                f"with other models or prompts (e.g. latent {foreign[0]} by "
                f"{e.explainer_model or '?'}, prompts {e.prompt_version or '?'}); use another "
                "--out, or --replace to explain them again"
            )
    return existing


def explain_latents(
    stats: FeatureStats,
    negatives: NegativePool,
    decode: Decoder | Any,
    out: str | Path,
    *,
    explainer: Any,
    scorer: Any = None,
    latents: str | Sequence[int] | LatentSelection = "all",
    config: AutointerpConfig | None = None,
    concurrency: int | None = None,
    replace: bool = False,
    dry_run: bool = False,
    progress: bool | None = None,
) -> AutointerpResult:
    """Explain and score `latents` from `stats` and `negatives`, writing to `out`.

    `explainer` and `scorer` (default: the explainer) are clients, callables taking chat
    messages and returning text, or specs (`openai:MODEL`, `hf:NAME`). `decode` turns a
    token id into its text: a tokenizer, or a function such as `TokenText(tokenizer)`.
    `concurrency` caps the latents worked on at once (default: what both clients take).
    With `dry_run` nothing is sent or written: the result's plan says what would be.
    """
    from saekit.preflight import check_out_folder
    from saekit.progress import bar

    cfg = config or AutointerpConfig()
    explainer = make_client(explainer)
    scorer = make_client(scorer, flag="--scorer") if scorer is not None else explainer
    if negatives.d_sae != stats.d_sae:
        raise ValueError(
            f"the non-activating contexts are for {negatives.d_sae} latents but the statistics "
            f"for {stats.d_sae}; they must come from the same SAE"
        )
    selection = parse_latents(latents)
    selection.check(stats.d_sae)
    ids = selection.choose(stats.fire_count, cfg.min_examples, cfg.seed)
    out = Path(out)
    check_out_folder(out)
    settings = _settings(cfg, explainer, scorer)
    existing = _check_folder(out, settings, ids, replace)
    done = [] if replace else [i for i in ids if i in existing]
    if not callable(decode) and hasattr(decode, "decode"):
        decode = TokenText(decode)  # a tokenizer
    cache = AnswerCache(out)
    runner = Runner(explainer, scorer, decode, cfg, cache)
    jobs, rare, costs = [], [], []
    with bar(desc="planning", unit="latent", total=len(ids), progress=progress) as shown:
        for latent in ids:
            shown.update(1)
            if latent in done:
                continue
            split = split_contexts(stats, latent, cfg)
            if split.n_distinct < cfg.min_examples:
                rare.append(latent)
                continue
            job = Job(
                latent, split, negatives.for_latent(latent, cfg.n_negatives, cfg.seed),
                float(stats.max_act[latent]),
            )
            jobs.append(job)
            costs.append(runner.cost(job))
    plan = Plan(
        todo=[j.latent for j in jobs], done=done, rare=rare,
        calls=sum(c[0] for c in costs), prompt_tokens=sum(c[1] for c in costs),
        completion_tokens=sum(c[2] for c in costs),
        first_prompt=runner.explainer_prompt(jobs[0]) if jobs else None,
        unscored=[j.latent for j in jobs if not runner.scorable(j)],
    )
    path = out / EXPLANATIONS_FILE
    result = AutointerpResult({}, path, plan)
    if dry_run:
        result.explanations = {i: existing[i] for i in ids if i in existing}
        return result
    logger.info("autointerp: %s", plan.summary())
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    if path.is_file() and drop_torn_tail(path):
        logger.info("%s: dropped an unfinished last line left by an interrupted run", path)
    workers = concurrency or min(explainer.concurrency, scorer.concurrency)
    with bar(desc="autointerp", unit="latent", total=len(jobs), progress=progress) as shown, \
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: set[Future[Explanation]] = {pool.submit(runner.run, job) for job in jobs}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    item = future.result()  # an endpoint failure stops the run here
                    append_explanations(out, [item])
                    result.new.append(item.latent)
                    shown.update(1)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    result.sent = cache.sent
    final = read_explanations(out)
    result.explanations = {i: final[i] for i in ids if i in final}
    logger.info("autointerp: %d latents explained (%d calls sent, the rest from the cache); "
                "written to %s", len(result.new), cache.sent, path)
    return result
