"""More than one process: data-parallel post-training under ``torchrun`` / ``accelerate launch``.

The launchers start one process per device and set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; ``init_from_env`` joins the process group from them (NCCL on CUDA, gloo on CPU). The trainer
then keeps one rule: **a run's numbers do not depend on how many processes compute them.**
1. ``train.batch_size`` stays the *global* micro-batch. The trainer draws the same global rows on every
   rank (seeded permutations) and each rank takes its contiguous slice (``local_rows``); the batch size
   must divide by the world size.
2. Gate noise is drawn per global sample: every row has its own generator, seeded from (seed, micro-batch
   index, global row index) (``row_seed``), so a row gets the same logistic noise whichever rank holds it
   and however many rows share its forward. One process uses the same rule, so 1 and N processes agree.
3. Gradients are averaged across ranks by DDP. Each rank weights its CE by its share of the global
   scored tokens, so the average is the single-process gradient of CE_global + beta * R_global.
4. The step's CE, R, open-gate counts and a non-finite flag are summed across ranks (``sum_across``)
   before the GECO multiplier moves, so every rank holds the same beta; a stop request on any rank
   (SIGTERM) stops all of them after the same step.
5. Held-out measurements run on every rank on the same blocks (identical numbers, no communication);
   only rank 0 writes checkpoints and logs (``World.is_main``); ``--resume`` loads on every rank.
FSDP (models that do not fit one device) is not wired in yet: every rank holds the whole model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from spartan_cli.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 when not launched distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def env_world() -> World:
    """The World the launcher describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return World(rank=rank, size=size, local_rank=int(os.environ.get("LOCAL_RANK", str(rank))))


def init_from_env(device_type: str) -> World:
    """Join the process group the launcher set up (once); SINGLE when the process was not launched so."""
    import torch
    import torch.distributed as dist

    world = env_world()
    if not world.distributed:
        return SINGLE
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(world.local_rank)  # "cuda" then means this rank's own device
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return current()


def current() -> World:
    """The World of the initialised process group, or SINGLE."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return World(rank=dist.get_rank(), size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", str(dist.get_rank()))))


def check_batch(batch_size: int, world: World) -> int:
    """Rows per rank of a global micro-batch of ``batch_size`` rows."""
    if batch_size % world.size:
        raise ConfigError(f"--batch-size {batch_size} (the global micro-batch) does not divide among {world.size} "
                          f"processes; use a multiple of {world.size}")
    return batch_size // world.size


def local_rows(rows, world: World):
    """This rank's contiguous slice of the global micro-batch ``rows`` (global order kept)."""
    per = check_batch(len(rows), world)
    return rows[world.rank * per:(world.rank + 1) * per]


def row_seed(seed: int, micro_batch: int, row: int) -> int:
    """Seed of the gate noise of global row ``row`` of global micro-batch ``micro_batch`` (a 63-bit mix)."""
    x = (seed * 0x9E3779B97F4A7C15 + micro_batch * 0xBF58476D1CE4E5B9 + row * 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    return (x * 0xD6E8FEB86659FD93 % (1 << 64)) >> 1


def sum_across(tensor, world: World):
    """Sum of ``tensor`` over ranks (every rank gets it); the tensor itself in a single process."""
    if not world.distributed:
        return tensor
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_across(flag: bool, world: World, device) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if not world.distributed:
        return flag
    import torch

    return bool(sum_across(torch.tensor([1.0 if flag else 0.0], device=device), world).item() > 0)


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def wrap(model, world: World):
    """The module to call for training steps: DDP around ``model`` when distributed, else ``model``.
    Gate states stay on ``model``'s attention modules, which DDP calls as they are."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    ids = [device.index if device.index is not None else world.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
