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
6. How ranks hold the model is ``train.parallel``, a registered ``Parallel`` (``PARALLEL``):
   - ``ddp``: every rank holds the whole model; DistributedDataParallel all-reduces (averages) gradients
     once per optimizer step (``no_sync`` on the other micro-batches).
   - ``fsdp``: torch's FSDP2 (``fully_shard``) on every decoder block, then on the root: each rank keeps
     1/N of every weight, gradient and AdamW moment; a block's weights are all-gathered for its forward and
     backward, gradients reduce-scattered (averaged) after every micro-batch. Same maths as ``ddp`` (fp32
     master weights; ``--dtype`` autocast as before). For models whose weights + AdamW state do not fit one
     device. The model is sharded before anything moves it (``place``), so no rank ever holds it whole
     on the device; loading a checkpoint still reads it whole into CPU memory on every rank.
   Checkpoints do not depend on the wrapper: sharded weights and optimizer moments are gathered into
   full tensors for rank 0 (``full_state_dict``, ``optimizer_state``), written as the same safetensors a
   single process writes, and cut back into shards on ``--resume`` (``shard_optimizer_state``). Every
   rank must take part in those gathers (the trainer and run_sparsify call them on every rank).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

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


# ------------------------------------------------------------------------------ how ranks hold the model
@dataclass(frozen=True)
class Parallel:
    """A way for ranks to share one model (``train.parallel``)."""

    name: str
    help: str
    place: Callable  # (model, device, world) -> None: the weights onto ``device`` (this rank's shards for FSDP)
    wrap: Callable  # (model, world) -> the module to call for training steps
    accumulating: Callable  # (step_model, last: bool) -> context around one micro-batch's forward + backward


def _ddp_place(model, device, world: World) -> None:
    model.to(device)


def _ddp_wrap(model, world: World):
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    ids = [device.index if device.index is not None else world.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _ddp_accumulating(step_model, last: bool):
    return nullcontext() if last else step_model.no_sync()  # gradients all-reduced on the last micro-batch only


def sharded(model) -> bool:
    """True when ``model`` is sharded by FSDP2 (its parameters are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _shard(model, device, world: World) -> None:
    """FSDP2 in place: every decoder block, then the root (embeddings, final norm, head); each block's
    weights move to ``device`` as it is sharded, so the whole model never sits on one device."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from spartan_cli.hf.models import adapter_for

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    mesh = init_device_mesh(device.type, (world.size,))
    for block in adapter_for(model).blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to(device)  # buffers and anything FSDP left where it was (a no-op for the shards)


def _fsdp_place(model, device, world: World) -> None:
    if world.distributed and not sharded(model):
        _shard(model, device, world)
    else:
        model.to(device)


def _fsdp_wrap(model, world: World):
    if not sharded(model):  # sparsify() called on a whole model: shard it where it lies
        _shard(model, next(model.parameters()).device, world)
    return model  # FSDP2 works in place: the model is the module to call


def _fsdp_accumulating(step_model, last: bool):
    return nullcontext()  # reduce-scatter every micro-batch: gradients stay sharded (averaging is linear)


PARALLEL: dict[str, Parallel] = {
    "ddp": Parallel("ddp", "every rank holds the whole model; gradients all-reduced (DistributedDataParallel)",
                    _ddp_place, _ddp_wrap, _ddp_accumulating),
    "fsdp": Parallel("fsdp", "weights, gradients and AdamW state sharded across ranks per decoder block (FSDP2)",
                     _fsdp_place, _fsdp_wrap, _fsdp_accumulating),
}


def parallel(name: str) -> Parallel:
    try:
        return PARALLEL[name]
    except KeyError:
        raise ConfigError(f"train.parallel must be one of {', '.join(sorted(PARALLEL))}, got {name!r}") from None


def place(model, device, world: World, how: str = "ddp") -> None:
    """Move ``model`` onto this rank's ``device``: whole (ddp, or one process), or as this rank's shards (fsdp)."""
    if not world.distributed:
        model.to(device)
        return
    parallel(how).place(model, device, world)


def wrap(model, world: World, how: str = "ddp"):
    """The module to call for training steps: ``model`` alone, else ``how``'s wrapper around it (DDP) or
    ``model`` sharded in place (FSDP). Gate states stay on ``model``'s attention modules, called as they are."""
    if not world.distributed:
        return model
    return parallel(how).wrap(model, world)


def accumulating(step_model, world: World, how: str, *, last: bool):
    """Context for one micro-batch of a gradient-accumulation step (``last``: the step's final one)."""
    if not world.distributed:
        return nullcontext()
    return parallel(how).accumulating(step_model, last)


# ----------------------------------------------------------------- checkpoints independent of the wrapper
def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_state_dict(model, world: World) -> dict | None:
    """The full (unsharded, CPU) weights of a sharded model on rank 0, ``{}`` on other ranks; ``None`` when
    ``model`` is not sharded (its own ``state_dict()`` is already full). Every rank must call it."""
    if not sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first: dict[int, str] = {}  # tied weights (GPT-2's head is its embedding) gather into separate copies:
    for name, p in model.named_parameters(remove_duplicate=False):  # alias them again, as in the model's own
        if name in full and first.setdefault(id(p), name) != name:  # state dict, so save_pretrained drops
            full[name] = full[first[id(p)]]  # the duplicate the same way for every wrapper
    return full


def optimizer_state(opt, world: World) -> dict:
    """``opt.state_dict()`` with sharded moments gathered into full tensors (the layout one process has).
    Rank 0 keeps the gathered tensors (on CPU); other ranks drop theirs. Every rank must call it."""
    state = opt.state_dict()
    if not any(_is_dtensor(v) for e in state["state"].values() for v in e.values()):
        return state
    full: dict = {}
    for idx, entry in state["state"].items():  # same order on every rank: the gathers pair up
        gathered = {k: v.full_tensor() if _is_dtensor(v) else v for k, v in entry.items()}
        if world.is_main:
            full[idx] = {k: v.cpu() if hasattr(v, "cpu") else v for k, v in gathered.items()}
    return {"state": full, "param_groups": state["param_groups"]}


def shard_optimizer_state(state: dict, opt) -> dict:
    """A full optimizer state (``optimizer_state``'s layout) cut into this rank's shards of ``opt``'s
    parameters, ready for ``opt.load_state_dict``; returned as it is when the parameters are not sharded."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in opt.param_groups for p in group["params"]]
    out = {}
    for idx, entry in state["state"].items():
        p = params[int(idx)]
        if _is_dtensor(p):  # every rank holds the full tensor: each keeps its own chunk, no communication
            entry = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                     if hasattr(v, "shape") and tuple(v.shape) == tuple(p.shape) else v for k, v in entry.items()}
        out[idx] = entry
    return {**state, "state": out}
