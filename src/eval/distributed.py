"""Data-parallel evaluation under ``torchrun``: which process this is, and the few collectives the runner needs.

``torchrun --nproc_per_node N -m eval ...`` starts N copies of ``python -m eval`` with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; the copies meet through env:// rendezvous.  Each copy
(a rank) holds a whole model (data parallel: nothing here shards a model) and generates its share of the
batches; what travels between ranks is a handful of small Python objects (the shared start time, the work
list, timing totals, the summary), so the object collectives and barriers go through gloo on the CPU.  On a
CUDA machine the group is ``cpu:gloo,cuda:nccl`` (NCCL for CUDA tensors, which nothing here sends; torch
creates its communicator only on first use) and a rank on ``device=auto``/``cuda`` uses ``cuda:LOCAL_RANK``.

Without ``WORLD_SIZE`` (a plain ``python -m eval``), or with ``WORLD_SIZE=1``, this is one process and every
function here is a no-op, so the single-process path is unchanged.  Light on import (no torch at the top):
the CLI's preflight asks :func:`env_world` before torch loads.
"""
from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

from .cli import UsageError

# ranks wait at the end for the slowest one (and at the start for rank 0 to read the directory): a rank
# that dies ends the whole job through torchrun, which stops the others, so this only bounds a rank that
# hangs; generous, because a large model's shard can run for hours and shards finish at different times
WAIT = timedelta(hours=24)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (``size`` 1: a plain single-process run)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        """Rank 0: reads the directory, merges the rank files, writes ``summary.json``, prints."""
        return self.rank == 0


def env_world() -> World:
    """The :class:`World` torchrun describes in ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (one process if unset)."""
    def get(name: str, default: int) -> int:
        value = os.environ.get(name)
        if value in (None, ""):
            return default
        try:
            return int(value)
        except ValueError:
            raise UsageError(f"environment variable {name}={value!r} is not an integer (torchrun sets RANK, "
                             f"WORLD_SIZE and LOCAL_RANK; unset them for a single-process run)") from None

    size = get("WORLD_SIZE", 1)
    rank = get("RANK", 0)
    local = get("LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size or local < 0:
        raise UsageError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local} "
                         f"(valid: WORLD_SIZE >= 1, 0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0)")
    return World(rank, size, local)


def world() -> World:
    """:func:`env_world`, joining the process group on the first call when there is more than one rank."""
    w = env_world()
    if w.distributed:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend=backend, init_method="env://", rank=w.rank, world_size=w.size,
                                    timeout=WAIT)
            atexit.register(_leave)
    return w


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj, w: World):
    """Rank 0's ``obj``, on every rank (picklable objects; a no-op for one process)."""
    if not w.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj, w: World) -> list:
    """Every rank's ``obj``, in rank order, on every rank; it returns once all ranks have reached it."""
    if not w.distributed:
        return [obj]
    import torch.distributed as dist

    out = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def rank_device(device, w: World):
    """The device this rank runs on: ``cuda`` without an index (``device=auto`` or ``cuda``) becomes
    ``cuda:LOCAL_RANK`` when there are several ranks (one model copy per GPU); anything else as given
    (``cuda:N`` puts every rank on GPU N, ``cpu`` every rank on the CPU)."""
    import torch

    if not w.distributed or device.type != "cuda" or device.index is not None:
        return device
    n = torch.cuda.device_count()
    if w.local_rank >= n:
        raise UsageError(f"rank {w.rank} has LOCAL_RANK={w.local_rank} but {n} CUDA device(s) are visible: start at "
                         f"most {n} processes per node (torchrun --nproc_per_node <= {n}), or put every rank on "
                         f"one device with device=cuda:N or device=cpu")
    torch.cuda.set_device(w.local_rank)
    return torch.device("cuda", w.local_rank)


def share_start_time(config) -> None:
    """Give every rank rank 0's ``${now:...}`` values, so Hydra's run and sweep directories (by default
    ``.../${now:%Y-%m-%d_%H-%M-%S}``) are one directory for all ranks even when the processes start in
    different seconds.  Rank 0 resolves the directories, which caches each ``now`` pattern in the
    config's resolver cache; the other ranks take that cache before resolving anything."""
    from omegaconf import OmegaConf

    w = world()
    if not w.distributed:
        return
    if w.leader:
        for key in ("hydra.run.dir", "hydra.sweep.dir"):
            OmegaConf.select(config, key, default=None)
        now = dict(OmegaConf.get_cache(config).get("now", {}))
    now = broadcast(now if w.leader else None, w)
    if not w.leader:
        cache = OmegaConf.get_cache(config)
        cache["now"] = now
        OmegaConf.set_cache(config, cache)


def label_logs(w: World) -> None:
    """Prefix this rank's log lines with ``[rank k/N]`` (all ranks append to one ``eval.log``) and keep the
    console to rank 0's lines plus the other ranks' warnings.  Call after Hydra set up logging (each job)."""
    if not w.distributed:
        return
    tag = f"[rank {w.rank}/{w.size}] "
    for h in logging.getLogger().handlers:
        fmt = h.formatter._fmt if h.formatter is not None else "%(message)s"
        if tag not in fmt:
            datefmt = h.formatter.datefmt if h.formatter is not None else None
            h.setFormatter(logging.Formatter(fmt.replace("%(message)s", tag + "%(message)s"), datefmt))
        if not w.leader and type(h) is logging.StreamHandler:  # the console, not eval.log (a FileHandler)
            h.setLevel(max(h.level, logging.WARNING))
