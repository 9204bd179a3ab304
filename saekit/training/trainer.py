"""The trainer: one stream of activations, one or more SAEs trained side by side.

It sees only tensors. A batch is a tensor [tokens, d_in] (every SAE reads it), a pair
(x, y) for transcoders, or a mapping {hook: tensor} from which each SAE picks its hook(s), so
one model forward pass can feed SAEs on several hooks. It knows nothing of models or text.
"""

from __future__ import annotations

import logging
import math
import numbers
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.config import dtype_name
from saekit.finite import (
    NonFiniteActivations,
    NonFiniteWeights,
    locate_non_finite,
    non_finite_report,
)
from saekit.progress import bar, progress_enabled, progress_off
from saekit.saes.base import SAE, LossSettings
from saekit.training import checkpoint as ckpt
from saekit.training.config import TrainingSection
from saekit.training.distributed import Parallelism
from saekit.training.init import (
    UnitNormDecoder,
    initialize_b_dec,
    start_firing_at,
)
from saekit.training.resample import DeadLatentResampler
from saekit.training.runlog import RunLog
from saekit.training.schedules import L0Controller, lr_at, sparsity_warmup_factor

log = logging.getLogger(__name__)

Batch = Tensor | tuple[Tensor, Tensor] | Mapping[str, Tensor]
#: Fraction of training over which the target-L0 controller's aim moves to the target.
L0_RAMP_FRACTION = 0.4
EvaluateFn = Callable[[SAE], Mapping[str, Any]]
#: Receives each log record (e.g. to forward it to Weights & Biases).
LogSink = Callable[[dict[str, Any]], None]


class TrainingDiverged(RuntimeError):
    """The loss or gradient became non-finite; the last good state was checkpointed."""


class NonFiniteInput(NonFiniteActivations, TrainingDiverged):
    """The loss became non-finite because a batch's activations were: the data is at fault,
    not the training. The last good state was checkpointed."""


@dataclass
class SAEJob:
    """One SAE to train and how: its hyper-parameters and which activations it reads."""

    sae: SAE
    cfg: TrainingSection
    name: str = "sae"
    """Names the SAE in logs, checkpoints and (with several SAEs) its sub-folder."""
    hook: str | None = None
    """Key of the input in mapping batches (may be None when the mapping has one key)."""
    hook_out: str | None = None
    """Transcoders with mapping batches: key of the activation to reconstruct."""
    norm_scale: float | None = None
    """Inputs (and targets) are multiplied by this during training; folded in at the end."""
    evaluate: EvaluateFn | None = None
    """Final held-out evaluation of the finished SAE."""
    keep_weights: bool = False
    """The SAE's weights are the starting point (fine-tuning): the first step does not set
    them from data (decoder bias, unit decoder rows, firing points at target_l0)."""

    def __post_init__(self) -> None:
        if self.cfg.lr is None:
            self.cfg = replace(self.cfg, lr=self.sae.default_lr)
        scale = self.norm_scale
        if scale is not None and (
            isinstance(scale, bool) or not isinstance(scale, numbers.Real)
            or not math.isfinite(scale) or scale <= 0
        ):
            raise ValueError(
                f"norm_scale of SAE {self.name!r} must be a positive finite number, got "
                f"{scale!r}; estimate it with estimate_norm_scaling_factor on clean data"
            )


@dataclass
class FitResult:
    """What a finished (or interrupted) run produced."""

    saes: dict[str, SAE]
    """The trained SAEs by job name, in the form they are saved (see SAE.published)."""
    metrics: dict[str, dict[str, Any]]
    """Final held-out metrics by job name (empty where a job had no evaluator)."""
    tokens: int
    """Training tokens seen."""
    interrupted: int | None = None
    """The signal number when the run stopped early on SIGINT/SIGTERM, else None."""
    sparsity: dict[str, Tensor] = field(default_factory=dict)
    """log10 firing frequency per latent over the second half of training, by job name."""


class _JobState:
    """What the trainer keeps per SAE besides its weights."""

    def __init__(self, job: SAEJob) -> None:
        cfg, sae = job.cfg, job.sae
        self.job = job
        self.unit_norm = (
            UnitNormDecoder() if UnitNormDecoder.applies(cfg.decoder_norm, sae) else None
        )
        self.uses_coefficient = sae.sparsity_control != "k"
        if cfg.target_l0 is not None and not self.uses_coefficient:
            if sae.cfg.k != cfg.target_l0:
                raise ValueError(
                    f"SAE {job.name!r} is {sae.architecture} with k={sae.cfg.k}, but target_l0="
                    f"{cfg.target_l0}; its sparsity is k, so target_l0 is k: build it with "
                    f"k={int(cfg.target_l0)}"
                )
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
        self.controller: L0Controller | None = None
        if cfg.target_l0 is not None and self.uses_coefficient:
            total_steps = max(cfg.tokens // cfg.batch_size, 1)
            self.controller = L0Controller(
                cfg.target_l0,
                cfg.sparsity_coefficient,
                cfg.l0_controller_gain,
                ramp_steps=int(L0_RAMP_FRACTION * total_steps),
                balance_start=sae.penalty_counts_latents,
            )
        self.lifts, resamples = cfg.remedies(sae.dead_latent_remedy)
        self.resampler = DeadLatentResampler(cfg) if resamples else None
        #: Latents resampled since the last log line.
        self.interval_resampled = 0
        d_sae = sae.cfg.d_sae * sae.latent_groups
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.int64, device=sae.device)
        self.fire_counts = torch.zeros(d_sae, dtype=torch.int64, device=sae.device)
        self.counted_tokens = 0
        self.interval: dict[str, float] = {}
        self.interval_steps = 0
        #: Latents per token in the last step (None before the first). Checkpointed: the
        #: architecture may choose how it computes a step by it (training_forward).
        self.last_l0: float | None = None
        #: The last step's other loss terms over its reconstruction loss (for the controller).
        self.interval_last_share = 0.0
        self.interval_coefficient = 0.0

    def coefficient(self, tokens_seen: int) -> float:
        if self.controller is not None:
            return self.controller.coefficient
        return self.job.cfg.sparsity_coefficient * sparsity_warmup_factor(self.job.cfg, tokens_seen)

    def settings(
        self, tokens_seen: int, replica_mean: Callable[[Tensor], Tensor] | None = None
    ) -> LossSettings:
        cfg = self.job.cfg
        return LossSettings(
            replica_mean=replica_mean,
            sparsity_coefficient=self.coefficient(tokens_seen),
            aux_k_coefficient=cfg.aux_k_coefficient,
            threshold_bandwidth=cfg.threshold_bandwidth,
            threshold_penalty=cfg.threshold_penalty,
            ste_to_input=cfg.ste_reaches_input,
            threshold_pre_act_coefficient=cfg.threshold_pre_act,
            dead_pre_act_coefficient=cfg.dead_pre_act_coefficient,
        )

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.job.cfg.dead_window

    def lift_due(self, before: int, after: int) -> bool:
        """Whether quiet latents are lifted after a step from `before` to `after` tokens.

        With a coefficient, every step: lifting every few steps made the L0 jump and sag,
        and the target-L0 controller, acting on the L0's trend, let lambda sink (a gated
        SAE ended at L0 43 for a target of 32). Top-k SAEs have no controller and their
        lift costs an encoder pass: every half quiet window."""
        if self.uses_coefficient:
            return True
        every = max(self.job.cfg.quiet_window // 2, 1)
        return before // every != after // every

    def quiet_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.job.cfg.quiet_window

    def remedy_mask(self) -> Tensor:
        """The latents the architecture's dead-latent term acts on this step."""
        if self.job.sae.dead_latent_remedy.loss_on_quiet:
            return self.quiet_mask()
        return self.dead_mask()

    def state_dict(self) -> dict[str, Any]:
        return {
            "sae": {k: v.detach().clone() for k, v in self.job.sae.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "controller": None if self.controller is None else self.controller.state_dict(),
            "tokens_since_fired": self.tokens_since_fired.clone(),
            "fire_counts": self.fire_counts.clone(),
            "counted_tokens": self.counted_tokens,
            "last_l0": self.last_l0,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.job.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.controller is not None and state["controller"] is not None:
            self.controller.load_state_dict(state["controller"])
        device = self.job.sae.device
        self.tokens_since_fired = state["tokens_since_fired"].to(device)
        self.fire_counts = state["fire_counts"].to(device)
        self.counted_tokens = int(state["counted_tokens"])
        self.last_l0 = state.get("last_l0")


class Trainer:
    """Train SAEJobs on a stream of batches. Call `fit()` (or `fit(resume=True)`)."""

    def __init__(
        self,
        jobs: SAEJob | list[SAEJob],
        data: Iterator[Batch],
        run_dir: str | Path | None = None,
        *,
        checkpoint_every: int | None = None,
        keep_checkpoints: int = 2,
        log_every: int = 20,
        progress: bool = False,
        log_sinks: list[LogSink] | None = None,
        parallel: Parallelism | None = None,
        periodic_eval: Any = None,
    ) -> None:
        jobs = [jobs] if isinstance(jobs, SAEJob) else list(jobs)
        if not jobs:
            raise ValueError("no SAE to train; pass at least one SAEJob")
        names = [j.name for j in jobs]
        if len(set(names)) != len(names):
            raise ValueError(f"SAEJob names must differ, got {names}")
        token_budgets = {j.cfg.tokens for j in jobs}
        if len(token_budgets) != 1:
            raise ValueError(
                f"SAEs trained side by side share one stream and one token budget; got "
                f"tokens={sorted(token_budgets)}. Give every job the same TrainingSection.tokens"
            )
        if checkpoint_every is not None and run_dir is None:
            raise ValueError("checkpoint_every needs a run_dir to write checkpoints into")
        self.parallel = parallel if parallel is not None else Parallelism()
        #: Every job of the run; `jobs` are those trained by this rank (all in one process).
        self.all_jobs = jobs
        self.jobs = [j for i, j in enumerate(jobs) if self.parallel.owns(i, len(jobs))]
        self.states = [_JobState(j) for j in self.jobs]
        self.data = data
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.total_tokens = jobs[0].cfg.tokens
        self.checkpoint_every = checkpoint_every
        self.keep_checkpoints = keep_checkpoints
        self.log_every = log_every
        self.progress = progress
        self.log_sinks = list(log_sinks or [])
        self.tokens_seen = 0
        #: Tokens seen at the last checkpoint written or restored (None: none yet).
        self._checkpoint_tokens: int | None = None
        self.step = 0
        self.batches_consumed = 0
        self._stop_signal: int | None = None
        #: A `saekit.training.periodic_eval.PeriodicEval`, or None.
        self.periodic_eval = periodic_eval
        self._eval_postfix: dict[str, str] = {}
        self._train_postfix: dict[str, str] = {}

    # ----- the loop ------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> FitResult:
        """Train to the token budget; with resume=True, first restore the last checkpoint."""
        if resume:
            self._restore()
        writer = self.parallel.is_writer
        runlog = RunLog(self.run_dir if writer else None, multi=len(self.all_jobs) > 1)
        if resume:
            runlog.truncate_after(self.tokens_seen)
        bar = self._progress_bar() if writer else None
        previous = self._install_signal_handlers()
        device = self.jobs[0].sae.device
        try:
            while self.tokens_seen < self.total_tokens:
                # Every rank stops at the same step when any of them was signalled.
                if self.parallel.any(self._stop_signal is not None, device):
                    if self._stop_signal is None:
                        self._stop_signal = signal.SIGTERM
                    self._checkpoint()
                    log.warning(
                        "stopped by signal %d after %d tokens (step %d); checkpoint written, "
                        "continue with --resume %s",
                        self._stop_signal, self.tokens_seen, self.step, self.run_dir,
                    )
                    return self._result(interrupted=self._stop_signal)
                batch = self._next_batch()
                n_tokens = self._train_step(batch)
                before = self.tokens_seen
                self.tokens_seen += n_tokens
                self.step += 1
                if bar is not None:
                    bar.update(n_tokens)
                if self.step % self.log_every == 0 or self.tokens_seen >= self.total_tokens:
                    record = self._log_record()
                    if record is not None:
                        runlog.write(record)
                        for sink in self.log_sinks:
                            sink(record)
                        if bar is not None:
                            bar.set_postfix(self._postfix(record), refresh=False)
                if self.periodic_eval is not None and self.periodic_eval.due(
                    before, self.tokens_seen
                ):
                    self._periodic_eval(runlog, bar)
                every = self.checkpoint_every
                if every and before // every != self.tokens_seen // every:
                    if self.tokens_seen < self.total_tokens:
                        self._checkpoint()
            # The finished state too, so that a larger token budget can extend the run.
            if self.checkpoint_every and self._checkpoint_tokens != self.tokens_seen:
                self._checkpoint()
        finally:
            if bar is not None:
                bar.close()
            self._restore_signal_handlers(previous)
        return self._finish()

    def _next_batch(self) -> Batch:
        try:
            batch = next(self.data)
        except StopIteration:
            raise ValueError(
                f"the activation stream ran out after {self.tokens_seen} tokens, but the run "
                f"needs {self.total_tokens}; lower tokens or provide more data"
            ) from None
        self.batches_consumed += 1
        return self.parallel.exchange(batch, self.all_jobs)

    def _train_step(self, batch: Batch) -> int:
        """Forward and backward every SAE, then step them all, or none if any diverged."""
        inputs = [self._select(batch, st.job) for st in self.states]
        n_tokens = self.parallel.global_rows(inputs[0][0].shape[0])
        if self.step == 0 and self.tokens_seen == 0:
            for st, (x, target) in zip(self.states, inputs, strict=True):
                self._initialize(st, x, target)
        # With several ranks, a rank whose SAE diverged must still join every collective of
        # the step; the failure is shared once all are done, and then every rank stops.
        failure: tuple[SAEJob, str, str | None] | None = None
        recons: list[Tensor] = []
        for st, (x, target) in zip(self.states, inputs, strict=True):
            job, sae = st.job, st.job.sae
            sae.train()
            settings = st.settings(self.tokens_seen, self.parallel.mean_of_replicas)
            out = sae.training_forward(
                x, target if sae.is_transcoder else None, settings, st.remedy_mask(), st.last_l0
            )
            if not torch.isfinite(out.loss):
                failure = failure or (
                    job, f"loss is {out.loss.item()}", self._input_problem(batch, job)
                )
                if not self.parallel.distributed:
                    break
            st.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            self.parallel.reduce_gradients(list(sae.parameters()))
            if st.unit_norm:
                st.unit_norm.project_gradient(sae)
            if job.cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), job.cfg.grad_clip)
                if not torch.isfinite(grad_norm):
                    failure = failure or (
                        job, f"gradient norm is {grad_norm.item()}",
                        self._input_problem(batch, job),
                    )
                    if not self.parallel.distributed:
                        break
            self._track(st, out.fire_counts(), out.losses, out.loss, n_tokens, settings)
            recons.append(out.recon.detach())
        device = self.jobs[0].sae.device
        if self.parallel.any(failure is not None, device):
            job, what, problem = failure or (self.jobs[0], "another rank's SAE diverged", None)
            self._diverged(job, what, problem)
        for st in self.states:
            for group in st.optimizer.param_groups:
                group["lr"] = lr_at(st.job.cfg, self.tokens_seen)
            st.optimizer.step()
            if st.unit_norm:
                st.unit_norm.after_step(st.job.sae)
            st.job.sae.post_optimizer_step()
            if st.controller is not None:
                st.controller.update(st.last_l0 or 0.0, st.interval_last_share)
        for st, (x, target), recon in zip(self.states, inputs, recons, strict=True):
            # Never after the last step: the saved SAE is the one the last step trained, not
            # one with freshly lifted latents that no step has weighed yet (a batch top-k SAE,
            # whose inference threshold does not cap its L0, fired above its k by their share).
            after = self.tokens_seen + n_tokens
            if st.lifts and after < st.job.cfg.tokens and st.lift_due(self.tokens_seen, after):
                self._lift(st, x)
            if st.resampler and st.resampler.due(self.tokens_seen, self.tokens_seen + n_tokens):
                self._resample(st, x, target, recon)
        return n_tokens

    @torch.no_grad()
    def _lift(self, st: _JobState, x: Tensor) -> None:
        """Lower the firing points of the job's quiet latents until they fire on this batch."""
        quiet = st.quiet_mask().nonzero().squeeze(1)
        if quiet.numel() == 0 or not st.last_l0:
            return
        sae = st.job.sae
        centred = self.parallel.gather_rows(sae.center(sae.prepare_input(x)))
        rate = st.job.cfg.lift_share * st.last_l0 / sae.cfg.d_sae
        sae.lift_latents(quiet, centred, rate)

    @torch.no_grad()
    def _resample(self, st: _JobState, x: Tensor, target: Tensor, recon: Tensor) -> None:
        """Start the job's dead latents afresh on this batch's poorly reconstructed rows
        (every data-parallel rank on the whole global batch, making the same choices)."""
        assert st.resampler is not None
        sae = st.job.sae
        prepared = sae.prepare_input(x)
        wanted = target.to(recon.dtype) if sae.is_transcoder else prepared
        centred = self.parallel.gather_rows(sae.center(prepared))
        residual = self.parallel.gather_rows(wanted - recon)
        firing_rate = (st.last_l0 or 0.0) / sae.cfg.d_sae
        started = st.resampler.resample(
            sae, st.optimizer, st.dead_mask(), centred, residual, firing_rate, self.step
        )
        st.tokens_since_fired[started] = 0
        st.interval_resampled += started.numel()

    def _select(self, batch: Batch, job: SAEJob, scale: bool = True) -> tuple[Tensor, Tensor]:
        """(input, target) for one job, on its device, scaled by its norm factor (unless
        `scale` is false)."""
        if isinstance(batch, Mapping):
            x = _pick(batch, job.hook, job.name, "hook")
            y = _pick(batch, job.hook_out, job.name, "hook_out") if job.sae.is_transcoder else x
        elif isinstance(batch, (tuple, list)):
            if len(batch) != 2:
                raise ValueError(f"a tuple batch must be (input, target), got {len(batch)} items")
            x, y = batch
        else:
            if job.sae.is_transcoder:
                raise ValueError(
                    f"SAE {job.name!r} is a transcoder and needs (input, target) pairs or "
                    "{hook: tensor} batches, but the stream yields single tensors"
                )
            x = y = batch
        widths = {"input": (x, job.sae.cfg.d_in), "target": (y, job.sae.cfg.output_width)}
        for what, (tensor, width) in widths.items():
            if job.sae.cfg.reshape_activations == "none" and tensor.shape[-1] != width:
                raise ValueError(
                    f"SAE {job.name!r} expects a batch {what} of width {width}, but the stream "
                    f"yields shape {tuple(tensor.shape)}; check the hook and the SAE's size"
                )
        device = job.sae.device
        x, y = x.to(device), y.to(device)
        if job.norm_scale is not None and scale:
            x, y = x * job.norm_scale, y * job.norm_scale
        return x, y

    @torch.no_grad()
    def _initialize(self, st: _JobState, x: Tensor, target: Tensor) -> None:
        sae = st.job.sae
        # Data-parallel ranks start from rank 0's weights and one b_dec from the global batch.
        self.parallel.sync_parameters(sae)
        if st.job.keep_weights:
            return
        if st.unit_norm:
            st.unit_norm.start(sae)
        target = self.parallel.gather_rows(target)
        initialize_b_dec(sae, st.job.cfg.b_dec_init, target.to(sae.dtype))
        cfg = st.job.cfg
        if cfg.target_l0 is not None and st.uses_coefficient and cfg.start_at_target:
            rows = self.parallel.gather_rows(x)
            start_firing_at(sae, sae.center(sae.prepare_input(rows)), cfg.target_l0)

    @torch.no_grad()
    def _track(
        self,
        st: _JobState,
        counts: Tensor,
        losses: dict[str, Tensor],
        loss: Tensor,
        n_tokens: int,
        settings: LossSettings,
    ) -> None:
        # One vector per step holds the firing counts [d_sae] and the loss values, so that
        # data-parallel ranks sum them in a single collective.
        names = ["loss", *(f"{k}_loss" for k in losses)]
        local = torch.cat(
            [counts.double(), torch.stack([loss.detach(), *losses.values()]).double()]
        )
        total = self.parallel.reduce_stats(local)
        d_sae = counts.shape[0]
        counts = total[:d_sae].round().to(torch.int64)
        loss_values = (total[d_sae:] / self.parallel.loss_replicas).tolist()
        st.tokens_since_fired += n_tokens
        st.tokens_since_fired[counts > 0] = 0
        if self.tokens_seen >= self.total_tokens // 2:
            st.fire_counts += counts
            st.counted_tokens += n_tokens
        l0 = float(counts.sum()) / n_tokens / st.job.sae.latent_groups
        st.last_l0 = l0
        mse = loss_values[names.index("mse_loss")] if "mse_loss" in names else 0.0
        st.interval_last_share = (loss_values[0] - mse) / max(mse, 1e-12)
        # Loss terms get a suffix: an L0 penalty term may be called "l0", like the metric.
        values = {"loss": loss_values[0], "l0": l0}
        values.update(dict(zip(names[1:], loss_values[1:], strict=True)))
        for key, value in values.items():
            st.interval[key] = st.interval.get(key, 0.0) + value
        st.interval_steps += 1
        st.interval_coefficient = settings.sparsity_coefficient

    def _input_problem(self, batch: Batch, job: SAEJob) -> str | None:
        """Why this batch, not the training, made the loss non-finite; None if it did not.

        Runs only after a non-finite loss, so it costs nothing while training is healthy."""
        raw = self._select(batch, job, scale=False)
        scaled = self._select(batch, job)
        names = ("input", "target") if job.sae.is_transcoder else ("input",)
        for what, tensor, used in zip(names, raw, scaled, strict=False):
            found = locate_non_finite(tensor)
            if found is not None:
                return (
                    f"the batch's {what} activations are not finite: "
                    f"{found.describe(('row', 'feature'))}"
                )
            if locate_non_finite(used) is not None:
                return (
                    f"the batch's {what} activations overflow when multiplied by the norm "
                    f"scaling factor {job.norm_scale:.6g}; the factor is wrong for this data"
                )
            # Finite, but so large that the squared error overflows the SAE's dtype.
            squares = used.to(job.sae.dtype).pow(2).sum(dim=-1)  # [batch]
            overflow = ~torch.isfinite(squares)
            if bool(overflow.any()):
                row = int(overflow.nonzero()[0])
                norm = float(tensor[row].double().norm())
                return (
                    f"row {row} of the batch's {what} activations has norm {norm:.3g}, whose "
                    f"square overflows {dtype_name(job.sae.dtype)} in training: the data "
                    f"holds an extreme outlier row (this batch holds {int(overflow.sum())})"
                )
        return None

    def _diverged(self, job: SAEJob, what: str, problem: str | None = None) -> None:
        where = ""
        if self.run_dir is not None:
            path = self._checkpoint()
            where = f"; the last good state is saved in {path} (resume with --resume)"
        if problem is not None:
            raise NonFiniteInput(
                f"training of SAE {job.name!r} stopped at step {self.step + 1} (batch "
                f"{self.batches_consumed} of the activation stream, after {self.tokens_seen} "
                f"tokens): {problem}. The activations are at fault, not the training: check "
                f"the model and data that produced them (or the activation cache){where}"
            )
        raise TrainingDiverged(
            f"training of SAE {job.name!r} diverged at step {self.step + 1} (after "
            f"{self.tokens_seen} tokens): {what}{where}. Try a lower lr (now {job.cfg.lr}), "
            "a learning-rate warm-up (lr_warmup_tokens), norm_scaling, or a smaller "
            "sparsity_coefficient"
        )

    # ----- logging -------------------------------------------------------------------------

    def _log_record(self) -> dict[str, Any] | None:
        """This step's log line on the writer (None on other ranks)."""
        record = self._local_log_record()
        if not self.parallel.saes_per_rank:
            return record if self.parallel.is_writer else None
        parts = self.parallel.gather_objects(record)
        if parts is None:
            return None
        merged: dict[str, Any] = {}
        for part in parts:
            merged.update(part)
        return merged

    def _local_log_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"step": self.step, "tokens": self.tokens_seen}
        multi = len(self.all_jobs) > 1
        for st in self.states:
            prefix = f"{st.job.name}/" if multi else ""
            steps = max(st.interval_steps, 1)
            values = {k: v / steps for k, v in st.interval.items()}
            values["lr"] = st.optimizer.param_groups[0]["lr"]
            values["dead_fraction"] = float(st.dead_mask().float().mean())
            if st.uses_coefficient:
                values["sparsity_coefficient"] = st.interval_coefficient
            if st.resampler is not None:
                values["resampled"] = st.interval_resampled
                st.interval_resampled = 0
            record.update({prefix + k: v for k, v in values.items()})
            st.interval, st.interval_steps = {}, 0
        return record

    def _postfix(self, record: dict[str, Any]) -> dict[str, str]:
        prefix = ""
        if len(self.all_jobs) > 1:
            # The SAE furthest behind (highest loss), named, stands for the run.
            names = [j.name for j in self.all_jobs if f"{j.name}/loss" in record]
            worst = max(names, key=lambda n: record[f"{n}/loss"])
            prefix = f"{worst}/"
        out = {
            "loss": f"{record[prefix + 'loss']:.4g}",
            "L0": f"{record[prefix + 'l0']:.1f}",
            "dead": f"{record[prefix + 'dead_fraction']:.1%}",
        }
        if prefix:
            out = {"SAEs": str(len(self.all_jobs)), "worst": prefix[:-1], **out}
        self._train_postfix = out
        return {**out, **self._eval_postfix}

    def _periodic_eval(self, runlog: RunLog, bar: Any) -> None:
        """Evaluate every SAE on the held-out sample and log it as an "eval" record
        ({"eval": metrics}, or {"eval": {name: metrics}} with several SAEs)."""
        assert self.periodic_eval is not None
        parallel = self.parallel
        local: dict[str, Any] = {}
        if parallel.saes_per_rank or parallel.is_writer:
            local = self.periodic_eval(self.jobs)
        if parallel.saes_per_rank:
            parts = parallel.gather_objects(local)
            local = {k: v for part in parts or [] for k, v in part.items()}
        if not parallel.is_writer:
            return
        evals = {j.name: local[j.name] for j in self.all_jobs if j.name in local}
        multi = len(self.all_jobs) > 1
        record = {
            "step": self.step, "tokens": self.tokens_seen,
            "eval": evals if multi else next(iter(evals.values())),
        }
        runlog.write(record)
        for sink in self.log_sinks:
            sink(record)
        self._eval_postfix = self.periodic_eval.postfix(evals)
        if bar is not None:
            bar.set_postfix({**self._train_postfix, **self._eval_postfix}, refresh=False)

    def _progress_bar(self) -> Any:
        if not progress_enabled(self.progress):
            return None
        return bar(desc="training", unit="tok", total=self.total_tokens, initial=self.tokens_seen)

    # ----- checkpoints and signals ---------------------------------------------------------

    def state_dict(self) -> dict[str, Any] | None:
        """The whole run's state on the writer, None on other ranks (a collective with
        several ranks: each sends its data position and random state, and in SAE-parallel
        mode its SAEs, to rank 0)."""
        device = self.jobs[0].sae.device
        data_state = None
        if hasattr(self.data, "state_dict"):
            data_state = self.data.state_dict()
        local: dict[str, Any] = {"rng": ckpt.rng_state(device), "data": data_state}
        if self.parallel.saes_per_rank or self.parallel.is_writer:
            local["jobs"] = {st.job.name: st.state_dict() for st in self.states}
        ranks = self.parallel.gather_objects(local)
        if ranks is None:
            return None
        jobs: dict[str, Any] = {}
        for part in ranks:
            jobs.update(part.get("jobs", {}))
        state = {
            "tokens": self.tokens_seen,
            "step": self.step,
            "batches": self.batches_consumed,
            "jobs": jobs,
            "rng": ranks[0]["rng"],
            "data": ranks[0]["data"],
            "saved_at": time.time(),
        }
        if self.parallel.distributed:
            state["world_size"] = self.parallel.world_size
            state["parallel"] = self.parallel.mode
            state["ranks"] = [{"rng": r["rng"], "data": r["data"]} for r in ranks]
        return state

    def _checkpoint(self) -> Path:
        assert self.run_dir is not None
        bad = self._non_finite_weights()
        if bad is not None:
            name, problem = bad
            raise TrainingDiverged(
                f"the weights of SAE {name!r} became non-finite by step {self.step} (after "
                f"{self.tokens_seen} tokens): {problem}. No checkpoint was written, so "
                f"{self._last_good()}. Try a lower lr (now {self.jobs[0].cfg.lr}), a "
                "learning-rate warm-up (lr_warmup_tokens) or norm_scaling"
            )
        state = self.state_dict()
        path = ckpt.checkpoint_dir(self.run_dir) / f"tokens_{self.tokens_seen:015d}"
        if state is not None:
            path = ckpt.write_checkpoint(
                self.run_dir, self.tokens_seen, state, self.keep_checkpoints
            )
            log.debug("checkpoint written to %s", path)
        self._checkpoint_tokens = self.tokens_seen
        # No rank runs ahead of a checkpoint that is still being written.
        self.parallel.barrier()
        return path

    def _restore(self) -> None:
        if self.run_dir is None:
            raise ValueError("resume needs the run_dir of the run to continue")
        # Rank 0 chooses the newest checkpoint that reads back whole (moving damaged newer
        # ones aside), so every rank resumes from the same one.
        chosen: str | None = None
        failure: str | None = None
        state: dict[str, Any] | None = None
        if self.parallel.is_writer:
            try:
                intact = ckpt.load_intact_checkpoint(self.run_dir)
            except ckpt.CorruptCheckpoint as err:
                failure = str(err)
            else:
                if intact is not None:
                    chosen, state = str(intact.path), intact.state
        chosen, failure = self.parallel.broadcast_object((chosen, failure))
        if failure is not None:
            raise ckpt.CorruptCheckpoint(failure)
        if chosen is None:
            raise FileNotFoundError(
                f"no checkpoint in {ckpt.checkpoint_dir(self.run_dir)}; the run wrote none "
                "before it stopped, so start it again without resume"
            )
        path = Path(chosen)
        if state is None:
            state = ckpt.read_checkpoint(path)
        state = self._own_rank_state(state, path)
        missing = sorted({st.job.name for st in self.states} - set(state["jobs"]))
        if missing:
            raise ValueError(
                f"checkpoint {path} has no state for SAE(s) {missing} (it has "
                f"{sorted(state['jobs'])}); resume with the same SAEs the run started with"
            )
        for st in self.states:
            st.load_state_dict(state["jobs"][st.job.name])
        self.tokens_seen = int(state["tokens"])
        self._checkpoint_tokens = self.tokens_seen
        self.step = int(state["step"])
        self.batches_consumed = int(state["batches"])
        if state["data"] is not None and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(state["data"])
        else:
            # No position to restore: replay the stream up to where the run was, which
            # reproduces it exactly when the stream is deterministic.
            for _ in range(self.batches_consumed):
                next(self.data)
        ckpt.set_rng_state(state["rng"], self.jobs[0].sae.device)
        log.info("resumed from %s at %d tokens (step %d)", path, self.tokens_seen, self.step)

    def _own_rank_state(self, state: dict[str, Any], path: Path) -> dict[str, Any]:
        """The checkpoint with this rank's data position and random state in front."""
        saved_world = int(state.get("world_size", 1))
        saved_mode = state.get("parallel", "single")
        if saved_world != self.parallel.world_size or (
            self.parallel.distributed and saved_mode != self.parallel.mode
        ):
            raise ValueError(
                f"checkpoint {path} was written by {saved_world} rank(s) in {saved_mode} mode, "
                f"but this run has {self.parallel.world_size} rank(s) in {self.parallel.mode} "
                "mode; resume with the same launch (torchrun --nproc-per-node, --nnodes)"
            )
        if "ranks" in state:
            mine = state["ranks"][self.parallel.rank]
            state = {**state, "rng": mine["rng"], "data": mine["data"]}
        return state

    def _install_signal_handlers(self) -> dict[int, Any] | None:
        if self.run_dir is None or threading.current_thread() is not threading.main_thread():
            return None

        def request_stop(signum: int, frame: Any) -> None:
            self._stop_signal = signum

        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, request_stop)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any] | None) -> None:
        for signum, handler in (previous or {}).items():
            signal.signal(signum, handler)

    # ----- the end -------------------------------------------------------------------------

    def _finish(self) -> FitResult:
        for st in self.states:
            _finalize(st)
        bad = self._non_finite_weights()
        if bad is not None:
            # Never hand on (to evaluation, saving, upload) an SAE that cannot be right.
            name, problem = bad
            scale = next((j.norm_scale for j in self.all_jobs if j.name == name), None)
            factor = "" if scale is None else (
                f" A norm scaling factor of {scale:.3g} (the inputs were multiplied by it) "
                "that far from 1 points to extreme activations in the data."
            )
            raise NonFiniteWeights(
                f"the trained SAE {name!r} holds non-finite weights once the norm scaling "
                f"factor and decoder norms are folded in: {problem}; it is not returned as "
                f"finished, and {self._last_good()}.{factor}"
            )
        return self._result(interrupted=None, final=True)

    def _non_finite_weights(self) -> tuple[str, str] | None:
        """(SAE name, what is wrong) for the first SAE of the run holding NaN or infinite
        weights, on every rank; None when all are finite."""
        found: tuple[str, str] | None = None
        for st in self.states:
            problem = non_finite_report(st.job.sae.state_dict())
            if problem is not None:
                found = found or (st.job.name, problem)
        # Every rank stops together: another rank's SAEs may be the bad ones.
        if self.parallel.any(found is not None, self.jobs[0].sae.device) and found is None:
            found = ("another rank's SAE", "its weights are not finite")
        return found

    def _last_good(self) -> str:
        """Where the run's last good state is, as the end of a sentence."""
        found = ckpt.latest_checkpoint(self.run_dir) if self.run_dir is not None else None
        if found is None:
            return "the run has no checkpoint to resume from"
        return f"the last good state stays in {found} (resume from it with --resume)"

    def _result(self, interrupted: int | None, final: bool = False) -> FitResult:
        saes, metrics, sparsity = {}, {}, {}
        # Data-parallel ranks hold identical SAEs: only the writer evaluates them.
        evaluates = final and (self.parallel.saes_per_rank or self.parallel.is_writer)
        for st in self.states:
            name = st.job.name
            sae = st.job.sae.published() if final else st.job.sae
            saes[name] = sae
            counted = max(st.counted_tokens, 1)
            sparsity[name] = torch.log10(st.fire_counts.double() / counted + 1e-10).float()
            if evaluates and st.job.evaluate is not None:
                sae.eval()
                with progress_off(not self.progress):  # its bar follows the trainer's
                    metrics[name] = dict(st.job.evaluate(sae))
            else:
                metrics[name] = {}
        if final and self.parallel.saes_per_rank:
            # The writer returns every rank's SAEs, so it can save the whole run.
            parts = self.parallel.gather_objects((saes, metrics, sparsity))
            if parts is not None:
                for part in parts:
                    saes.update(part[0])
                    metrics.update(part[1])
                    sparsity.update(part[2])
                order = [j.name for j in self.all_jobs]
                saes = {n: saes[n] for n in order}
                metrics = {n: metrics[n] for n in order}
                sparsity = {n: sparsity[n] for n in order}
        return FitResult(saes, metrics, self.tokens_seen, interrupted, sparsity)


@torch.no_grad()
def _finalize(st: _JobState) -> None:
    """Fold the training-time input scale and the decoder norms into the weights."""
    sae = st.job.sae
    if st.job.norm_scale is not None:
        sae.fold_activation_norm_scaling_factor(st.job.norm_scale)
    try:
        sae.fold_W_dec_norm()
    except ValueError as err:  # an architecture whose function folding would change
        log.info("decoder norms of %r left as trained: %s", st.job.name, err)


def _pick(batch: Mapping[str, Tensor], key: str | None, name: str, what: str) -> Tensor:
    if key is None:
        if len(batch) == 1:
            return next(iter(batch.values()))
        raise ValueError(
            f"SAE {name!r} has no {what} set, but batches hold several hooks "
            f"({', '.join(batch)}); set SAEJob.{what}"
        )
    if key not in batch:
        raise ValueError(f"SAE {name!r} reads {what} {key!r}, but batches hold {', '.join(batch)}")
    return batch[key]
