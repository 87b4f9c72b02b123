"""Data parallelism through torch.distributed: the process group, data shards, reductions, the launcher.

A run started by torchrun (``RANK``, ``WORLD_SIZE`` ... in the environment) joins a process group:
gloo on the CPU, NCCL on CUDA. Every rank holds the whole dataset and takes its own slice of each
global batch of one shuffled order per epoch, so ``--batch-size`` stays the global batch.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from bnpipe.errors import BnpipeError, one_line


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 logs and writes the artifacts."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group is up (also for a world of one under torchrun)."""
        return dist.is_available() and dist.is_initialized()


SINGLE = World()


def launched_by_torchrun() -> bool:
    """torchrun (or any launcher speaking its environment protocol) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_world() -> World:
    """This process's place as torchrun's environment gives it (``SINGLE`` without torchrun), before any group exists.

    Raises:
        BnpipeError: RANK, WORLD_SIZE or LOCAL_RANK is not an integer, or RANK is outside WORLD_SIZE.
    """
    if not launched_by_torchrun():
        return SINGLE
    try:
        world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        raise BnpipeError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set them through torchrun)") from None
    if not 0 <= world.rank < world.size:
        raise BnpipeError(f"RANK {world.rank} is outside WORLD_SIZE {world.size}")
    return world


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def init_world(device: torch.device, timeout_s: float) -> tuple[World, torch.device]:
    """Join the process group torchrun describes, or return the single-process world.

    Args:
        device: The device asked for; on CUDA each rank takes ``cuda:LOCAL_RANK``.
        timeout_s: Seconds to wait for the other ranks (store connection and each collective).

    Returns:
        This process's world and the device it trains on.

    Raises:
        BnpipeError: The group could not be formed within ``timeout_s`` (an unreachable master,
            missing ranks) or the environment is inconsistent.
    """
    world = env_world()
    if world is SINGLE:
        return SINGLE, device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        with _stderr_held_back() as held:
            timeout = timedelta(seconds=timeout_s)
            store, _, _ = next(dist.rendezvous("env://", world.rank, world.size, timeout=timeout))
            # torchrun may keep its store across restarts: a fresh prefix per attempt, or the restarted
            # ranks could read the dead ranks' gloo addresses from the last attempt.
            store = dist.PrefixStore(f"bnpipe/attempt_{restart_count()}", store)
            dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.size, timeout=timeout,
                                    device_id=device if device.type == "cuda" else None)
            # The first collective proves that every rank is there, within the timeout, not at step 1.
            dist.barrier()
        sys.stderr.write("".join(held))  # joined: what c10d said goes out after all
    except Exception as exc:  # noqa: BLE001 - c10d raises DistStoreError, RuntimeError, TimeoutError, ValueError
        raise BnpipeError(f"distributed setup: rank {world.rank} of {world.size} could not join the {backend} "
                          f"process group at {where} (timeout {timeout_s:g}s): {one_line(exc, 160)}") from None
    return world, device


@contextlib.contextmanager
def _stderr_held_back() -> Iterator[list[str]]:
    """Hold back file descriptor 2 (c10d's C++ logger prints stack traces there); yields what it got, at exit."""
    sys.stderr.flush()
    saved, held = os.dup(2), []
    with tempfile.TemporaryFile("w+") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield held
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            held.append(f.read())


def close_world() -> None:
    """Leave the process group, if one is up."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of ``n`` samples for ``epoch``: a function of (seed, epoch) alone.

    So a resumed run, or one with another number of ranks, sees the same batches.
    """
    key = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.randperm(n, generator=torch.Generator().manual_seed(key))


def check_batch(batch_size: int, processes: int) -> None:
    """Refuse a global batch that cannot give each of ``processes`` at least one sample (BN needs samples).

    Raises:
        BnpipeError: ``batch_size`` is under ``processes``.
    """
    if batch_size < processes:
        raise BnpipeError(f"--batch-size {batch_size}: the global batch is split over {processes} processes; "
                          f"give it at least {processes}")


def batch_count(samples: int, batch_size: int, world: World) -> int:
    """Global batches in an epoch of ``samples``: a last batch with fewer samples than ranks is dropped,
    so that no rank gets an empty batch (BN needs samples)."""
    full, rest = divmod(samples, batch_size)
    return full + (rest >= world.size)


def local_batches(order: torch.Tensor, batch_size: int, world: World) -> Iterator[tuple[torch.Tensor, int]]:
    """This rank's slice of each of the :func:`batch_count` global batches of ``order``, with the batch's size.

    The slices of one batch differ in size by at most one.
    """
    for start in range(0, batch_count(order.shape[0], batch_size, world) * batch_size, batch_size):
        batch = order[start : start + batch_size]
        yield batch.tensor_split(world.size)[world.rank], batch.shape[0]


def all_reduce_sum(values: Sequence[float | torch.Tensor], device: torch.device, world: World) -> list[float]:
    """Sum numbers over the ranks (a no-op in one process), in float64."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if world.distributed:
        dist.all_reduce(t)
    return t.tolist()


def broadcast_buffers(module: nn.Module, world: World) -> None:
    """Give every rank rank 0's buffers (BN statistics): the ones the checkpoint holds."""
    if world.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def launch(nproc_per_node: int, train_args: list[str]) -> None:
    """Hand ``bnpipe train TRAIN_ARGS`` over to torch.distributed.run with ``nproc_per_node`` workers.

    A standalone (one-node) rendezvous on a free local port. With several workers each gets
    ``OMP_NUM_THREADS=1`` unless the variable is set.

    Raises:
        BnpipeError: A worker failed (its own error line is printed above by that worker).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if nproc_per_node > 1:
        # Small convolutions use several threads poorly: one per process, as torchrun would set it.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    argv = ["--standalone", "--nproc-per-node", str(nproc_per_node), "-m", "bnpipe", "train", *train_args]
    try:
        torchrun(argv)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        raise BnpipeError(f"training worker rank {rank} of {nproc_per_node} failed (exit code {failure.exitcode}); "
                          "its error is above") from None
    except SignalException as exc:  # Ctrl-C or a kill reached the launcher: it has stopped the workers
        raise SystemExit(128 + int(exc.sigval)) from None  # the shell's status for death by that signal
    finally:
        sys.stdout.flush()
