"""train-neural over many processes (torchrun): which (model, fold) fits a rank runs, and work done once.

The fits are independent, so they are spread, not synchronised: the pending jobs, in a fixed order
(models as given, folds ascending), are dealt round-robin, job i to rank i % size. A fold trains the same
on any rank (it seeds itself from options.seed and its fold number; threads per rank are fixed), so the
run's result does not depend on the world size or on which rank fitted what. What must happen once (the
folds, run.json, creating each predictions.h5) is done by the main rank and handed to the others.

One process (no torchrun) is rank 0 of 1: it gets every job, and nothing here communicates.
"""
import torch

from neural.outputs import RunError


class RankError(RunError):
    """Another rank stopped the run: raised on the ranks that were waiting for it."""


def on_main(world, work):
    """work() run on the main rank only; its result (picklable) on every rank. An error there is raised
    on the main rank as it is and on the others as a RankError quoting it, so no rank waits forever."""
    if not world.distributed:
        return work()
    outcome = None
    if world.is_main:
        try:
            outcome = ("ok", work())
        except Exception as err:
            world.broadcast(("error", f"{type(err).__name__}: {err}"))
            raise
    status, value = world.broadcast(outcome)
    if status == "error":
        raise RankError(f"rank 0 stopped the run: {value}")
    return value


def rank_jobs(jobs, world):
    """This rank's share of the pending jobs [(model, fold), ...]: every size-th, from its rank."""
    return list(jobs)[world.rank::world.size]


def owner(index, world):
    """The rank that merges and finishes the index-th model (round-robin over the models)."""
    return index % world.size


def set_threads(threads, world):
    """Torch CPU threads: `threads` when given; under torchrun each rank's share of the node's cores (the
    ranks would otherwise each take them all); one process without --threads keeps torch's default."""
    if threads:
        torch.set_num_threads(threads)
    elif world.distributed:
        torch.set_num_threads(world.cpu_threads())
