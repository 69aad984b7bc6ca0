"""Many processes under torchrun: which rank this process is, its share of the work, its device, a barrier.

torchrun (or Slurm launching it) sets WORLD_SIZE, RANK and LOCAL_RANK (and MASTER_ADDR / MASTER_PORT);
without them this is one process, rank 0 of 1, and torch.distributed is never initialised, so every
command runs as before. With them the process group is initialised once: nccl when the ranks use GPUs,
gloo on the CPU. Each rank takes its local GPU (LOCAL_RANK) or, on the CPU, its share of the cores.

    world = current_world()            # World(rank, size, local_rank, local_size)
    start, end = world.share(n)        # this rank's contiguous range of n items
    world.barrier()                    # no-op for one process
"""
import atexit
import datetime
import os
from dataclasses import dataclass

import torch

from core.device import resolve_device

# a rank may wait at a barrier while another finishes hours of extraction: far above torch's 30 min default
BARRIER_TIMEOUT = datetime.timedelta(hours=48)


class WorldError(RuntimeError):
    pass


@dataclass(frozen=True)
class World:
    rank: int = 0              # global rank, 0 .. size - 1
    size: int = 1              # WORLD_SIZE
    local_rank: int = 0        # rank on this node: picks the GPU
    local_size: int = 1        # ranks on this node: they share its CPU cores

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.size > 1

    def share(self, n):
        """(start, end): this rank's contiguous range of n items; the first n % size ranks get one more."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def device(self, requested="auto"):
        """'cuda:<local_rank>' for a rank on a GPU (and made current), else the device resolve_device gives."""
        device = resolve_device(requested)
        if device == "cuda" and self.distributed:
            if self.local_rank >= torch.cuda.device_count():
                raise WorldError(f"LOCAL_RANK {self.local_rank} but torch sees {torch.cuda.device_count()} GPU(s) "
                                 "on this node; launch at most one process per GPU")
            torch.cuda.set_device(self.local_rank)
            return f"cuda:{self.local_rank}"
        return device

    def cpu_threads(self):
        """Torch threads for this rank on the CPU: its share of the node's cores (at least 1)."""
        return max(1, (os.cpu_count() or 1) // self.local_size)

    def barrier(self):
        if self.distributed:
            torch.distributed.barrier()

    def broadcast(self, obj):
        """The main rank's `obj` (any picklable value), on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def _env_int(name, default):
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as err:
        raise WorldError(f"environment variable {name}={value!r} is not an integer") from err


def current_world(device="auto"):
    """The World this process belongs to, initialising torch.distributed once when WORLD_SIZE > 1."""
    size = _env_int("WORLD_SIZE", 1)
    world = World(rank=_env_int("RANK", 0), size=size, local_rank=_env_int("LOCAL_RANK", 0),
                  local_size=_env_int("LOCAL_WORLD_SIZE", size))
    if not 0 <= world.rank < world.size:
        raise WorldError(f"RANK {world.rank} is outside 0 .. WORLD_SIZE - 1 = {world.size - 1}")
    if world.distributed and not torch.distributed.is_initialized():
        backend = "nccl" if resolve_device(device) == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, timeout=BARRIER_TIMEOUT)
        atexit.register(torch.distributed.destroy_process_group)     # torch warns at exit otherwise
    return world
