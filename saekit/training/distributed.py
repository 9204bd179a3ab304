"""Scale-out on torch.distributed: data-parallel SAE training, and SAEs split across ranks.

Processes are launched by `torchrun`, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT; `DistEnv.from_env` reads them and `init_process_group` joins the group with
the backend PyTorch pairs with the device type (gloo on cpu, nccl on NVIDIA GPUs, ...).

The trainer talks to the other ranks only through a `Parallelism`:

- `Parallelism` (one process): every call is the identity, no collective runs.
- `DataParallel`: every rank trains every SAE on its own shard of each global batch. SAE
  gradients are averaged with one all-reduce per SAE per step (the same reduction DDP does,
  done by hand because the trainer's step is not a `module(x)` call and its post-backward
  projections must see the averaged gradient); firing counts and metrics are summed, so
  dead-latent tracking and logs describe the global batch.
- `SAEParallel`: the SAEs are dealt out across ranks (job i lives on rank i % world_size).
  Each rank runs the model on its shard of the tokens; each hook's activations are then
  gathered onto the ranks whose SAEs read that hook, so every SAE trains on the whole
  global batch with no gradient communication at all.

Only rank 0 writes checkpoints, logs and outputs; checkpoints hold every rank's data
position and random state, so all ranks resume from the same checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a torchrun launch (a single process when not launched)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        """Read RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them."""
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env:
            return cls()
        values = {}
        for name in ENV_VARS:
            raw = env.get(name, "0")
            try:
                values[name] = int(raw)
            except ValueError:
                raise ValueError(
                    f"environment variable {name}={raw!r} is not an integer; launch with "
                    "torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK"
                ) from None
        rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
        if world < 1 or not 0 <= rank < world or local < 0:
            raise ValueError(
                f"inconsistent launch environment: RANK={rank}, WORLD_SIZE={world}, "
                f"LOCAL_RANK={local}; need WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE"
            )
        return cls(rank, world, local)


def local_device(device: str | torch.device, env: DistEnv) -> torch.device:
    """The device this rank uses: an accelerator type without an index gets LOCAL_RANK's."""
    device = torch.device(device)
    if device.type == "cpu" or device.index is not None or not env.distributed:
        return device
    return torch.device(device.type, env.local_rank)


def init_process_group(device: str | torch.device, env: DistEnv | None = None) -> DistEnv:
    """Join the torchrun process group (a no-op for a single process); returns the env."""
    env = DistEnv.from_env() if env is None else env
    if not env.distributed or dist.is_initialized():
        return env
    device = local_device(device, env)
    if device.type != "cpu":
        # Collectives on accelerators use the current device of each process.
        torch.get_device_module(device.type).set_device(device)
    backend = dist.get_default_backend_for_device(device)
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size)
    return env


#: How long a rank waits at the end for the others before tearing the group down anyway.
TEARDOWN_WAIT = timedelta(seconds=60)


def destroy_process_group() -> None:
    """Tear the process group down once every rank is done with it: on gloo a rank that
    closes its connections while another is still in a collective (rank 0 writing the last
    checkpoint) can abort the process (SIGABRT) after a finished run. A rank that died is
    waited for TEARDOWN_WAIT at most."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=TEARDOWN_WAIT)
        except RuntimeError:
            pass  # another rank failed or left: nothing left to wait for
    dist.destroy_process_group()


class Parallelism:
    """One process: the identity for every operation the trainer asks of the other ranks."""

    rank = 0
    world_size = 1
    mode = "single"
    #: Each rank holds SAEs of its own (not copies of the others'): each rank saves,
    #: logs and evaluates its own, and the writer gathers them.
    saes_per_rank = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def loss_replicas(self) -> int:
        """Ranks over whose batch shards one SAE's summed loss statistics are averaged."""
        return 1

    @property
    def is_writer(self) -> bool:
        """Only this rank writes checkpoints, logs and outputs."""
        return self.rank == 0

    def owns(self, index: int, n_jobs: int) -> bool:
        """Whether job `index` (of `n_jobs`) trains on this rank."""
        return True

    def mean_of_replicas(self, value: Tensor) -> Tensor:
        """The mean of `value` over the ranks whose shards make up one batch (a loss term's
        normaliser): itself in one process."""
        return value

    def exchange(self, batch: Any, jobs: Sequence[Any]) -> Any:
        """The batch this rank's SAEs train on, from the rows this rank produced."""
        return batch

    def global_rows(self, local_rows: int) -> int:
        """Tokens in the global batch of which this rank holds `local_rows`."""
        return local_rows

    def gather_rows(self, rows: Tensor) -> Tensor:
        """Every rank's shard of a data-parallel batch, concatenated in rank order."""
        return rows

    def sync_parameters(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's parameters."""

    def reduce_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average data-parallel gradients over ranks."""

    def reduce_stats(self, values: Tensor) -> Tensor:
        """Sum per-rank statistics of a data-parallel step (identity otherwise)."""
        return values

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when `flag` is true on any rank."""
        return flag

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on the writer (in rank order), None elsewhere."""
        return [obj]

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        return obj

    def barrier(self) -> None:
        """Wait for every rank."""


class _Collective(Parallelism):
    """Shared plumbing for the torch.distributed strategies."""

    def __init__(self, group: Any = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised; launch with torchrun and call "
                "saekit.training.distributed.init_process_group first"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def any(self, flag: bool, device: torch.device) -> bool:
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item() > 0)

    def gather_objects(self, obj: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.is_writer else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        holder = [obj if self.is_writer else None]
        dist.broadcast_object_list(holder, src=0, group=self.group)
        return holder[0]

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def _all_gather(self, rows: Tensor) -> Tensor:
        rows = rows.contiguous()
        parts = [torch.empty_like(rows) for _ in range(self.world_size)]
        dist.all_gather(parts, rows, group=self.group)
        return torch.cat(parts)


class DataParallel(_Collective):
    """Every rank trains every SAE on its shard of the global batch; gradients are averaged.

    Every rank must hold the same number of rows per step (the global batch split evenly).
    Equivalent to one process on the global batch for losses that are means over tokens;
    a batch-wide rule (a top-k over the whole batch) is taken within each rank's shard.
    """

    mode = "data"

    @property
    def loss_replicas(self) -> int:
        return self.world_size

    def global_rows(self, local_rows: int) -> int:
        return local_rows * self.world_size

    def gather_rows(self, rows: Tensor) -> Tensor:
        return self._all_gather(rows)

    @torch.no_grad()
    def sync_parameters(self, module: torch.nn.Module) -> None:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0, group=self.group)

    @torch.no_grad()
    def reduce_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        # One flat buffer per SAE: one collective instead of one per parameter. A missing
        # gradient counts as zero; it stays missing so the optimizer skips it as before.
        grads = [
            p.grad if p.grad is not None else torch.zeros_like(p) for p in params
        ]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            if p.grad is not None:
                p.grad.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    def reduce_stats(self, values: Tensor) -> Tensor:
        values = values.clone()
        dist.all_reduce(values, group=self.group)
        return values

    @torch.no_grad()
    def mean_of_replicas(self, value: Tensor) -> Tensor:
        if self.loss_replicas == 1:
            return value
        return self.reduce_stats(value) / self.loss_replicas


class SAEParallel(_Collective):
    """The SAEs are dealt out across ranks; each receives its hooks' rows from every rank.

    The model forward is still split over the ranks (each produces its shard of the tokens
    for every hook); the rows are then gathered onto the ranks that train on them.
    """

    mode = "sae"
    saes_per_rank = True

    def owns(self, index: int, n_jobs: int) -> bool:
        if n_jobs < self.world_size:
            raise ValueError(
                f"SAE-parallel training deals SAEs out across ranks, but there are {n_jobs} "
                f"SAE(s) for {self.world_size} ranks; use as many ranks as SAEs or fewer, or "
                "data-parallel training"
            )
        return index % self.world_size == self.rank

    def exchange(self, batch: Any, jobs: Sequence[Any]) -> Any:
        if isinstance(batch, Tensor):
            return self._all_gather(batch)
        if isinstance(batch, (tuple, list)):
            return tuple(self._all_gather(t) for t in batch)
        needed: dict[str, set[int]] = {}
        for index, job in enumerate(jobs):
            for key in _hooks_of(job, batch):
                needed.setdefault(key, set()).add(index % self.world_size)
        out = {}
        for key in sorted(needed):  # the same order on every rank
            rows = batch[key].contiguous()
            owners = needed[key]
            if len(owners) == self.world_size:
                out[key] = self._all_gather(rows)
                continue
            for owner in sorted(owners):
                parts = None
                if owner == self.rank:
                    parts = [torch.empty_like(rows) for _ in range(self.world_size)]
                dist.gather(rows, parts, dst=owner, group=self.group)
                if parts is not None:
                    out[key] = torch.cat(parts)
        return out


def _hooks_of(job: Any, batch: Mapping[str, Tensor]) -> list[str]:
    keys = [job.hook if job.hook is not None else next(iter(batch))]
    if job.sae.is_transcoder and job.hook_out is not None:
        keys.append(job.hook_out)
    return keys


def make_parallelism(mode: str = "data", group: Any = None) -> Parallelism:
    """The strategy for `mode` ("data" or "sae"); a single process gets `Parallelism()`."""
    if mode not in ("data", "sae"):
        raise ValueError(f"parallel mode {mode!r} is not known; use 'data' or 'sae'")
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return Parallelism()
    return DataParallel(group) if mode == "data" else SAEParallel(group)


class RankSlice(Iterator[Any]):
    """This rank's rows of every batch of a global stream: rows [rank*n/W, (rank+1)*n/W).

    For streams that are cheap to produce in full on every rank (cached or synthetic
    activations); model-backed stores shard their token windows instead. Keeps the inner
    stream's `state_dict` / `load_state_dict`, so resume stays exact.
    """

    def __init__(self, inner: Iterator[Any], rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.inner, self.rank, self.world_size = inner, rank, world_size

    def __iter__(self) -> RankSlice:
        return self

    def __next__(self) -> Any:
        return _slice(next(self.inner), self.rank, self.world_size)

    def state_dict(self) -> Any:
        return self.inner.state_dict()  # type: ignore[attr-defined]

    def load_state_dict(self, state: Any) -> None:
        self.inner.load_state_dict(state)  # type: ignore[attr-defined]


def _slice(batch: Any, rank: int, world: int) -> Any:
    if isinstance(batch, Mapping):
        return {k: _slice(v, rank, world) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(_slice(v, rank, world) for v in batch)
    n = batch.shape[0]
    if n % world:
        raise ValueError(
            f"a batch of {n} rows does not split evenly over {world} ranks; make the global "
            f"batch size a multiple of the number of ranks"
        )
    share = n // world
    return batch[rank * share : (rank + 1) * share]
