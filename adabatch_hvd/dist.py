"""Every Horovod call of the project, in one place (the only module that imports horovod)."""

from __future__ import annotations

import os

import horovod.torch as hvd
import torch
from horovod.common.elastic import State
from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt

from .threads import Choice as ThreadChoice, choose as choose_threads

# What a live resize raises inside hvd.elastic.run: a lost worker, or hosts added/removed.
ELASTIC_INTERRUPTS = (HorovodInternalError, HostsUpdatedInterrupt)


def init(threads: int = 0, horovod_env: dict | None = None) -> ThreadChoice:
    """Start Horovod and size torch's CPU threads so that local ranks don't oversubscribe cores.

    The count is `threads` (run.threads) if > 0, else OMP_NUM_THREADS, else the usable cores (affinity
    and cgroup CPU quota) / local ranks: see threads.choose. Returned for the caller to log, since
    logging is set up after this. `horovod_env` (HOROVOD_* tuning variables, see
    CommConfig.horovod_env) goes into the environment first: Horovod's core reads it in init().
    """
    os.environ.update(horovod_env or {})
    hvd.init()
    choice = choose_threads(threads, hvd.local_size())
    torch.set_num_threads(choice.count)
    return choice


def horovod_version() -> str:
    import horovod

    return str(horovod.__version__)


def rank() -> int:
    return hvd.rank()


def size() -> int:
    return hvd.size()


def local_rank() -> int:
    return hvd.local_rank()


def is_main() -> bool:
    return hvd.rank() == 0


def allreduce_sum(tensor: torch.Tensor, name: str | None = None) -> torch.Tensor:
    return hvd.allreduce(tensor, op=hvd.Sum, name=name)


def allreduce_mean_async(tensor: torch.Tensor, name: str):
    """Start an averaging allreduce in place (the gradients' op, so Horovod can fuse the two);
    `wait(handle)` returns the tensor once it is done."""
    return hvd.allreduce_async_(tensor, op=hvd.Average, name=name)


def wait(handle) -> torch.Tensor:
    return hvd.synchronize(handle)


def allreduce_mean(tensor: torch.Tensor, name: str | None = None) -> torch.Tensor:
    return hvd.allreduce(tensor, op=hvd.Average, name=name)


# Horovod matches collectives by name, and its *_object helpers default the name to the object's
# type: a root sending a dict while the others pass None would then wait forever. Fixed names.
def broadcast_object(obj, root: int = 0, name: str = "broadcast_object"):
    return hvd.broadcast_object(obj, root_rank=root, name=name)


def allgather_object(obj, name: str = "allgather_object") -> list:
    return hvd.allgather_object(obj, name=name)


def broadcast_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, root: int = 0) -> None:
    """Make every rank start from rank `root`'s parameters, buffers and optimizer state.

    hvd.broadcast_optimizer_state is not used: on an optimizer without state it first runs a
    step() with zero gradients, and with weight decay that step shrinks the weights (and seeds
    SGD's momentum with wd * w), on the non-root ranks even after the parameter broadcast. The
    state dict is sent as one object instead, which leaves the weights alone.
    """
    hvd.broadcast_parameters(model.state_dict(), root_rank=root)
    if optimizer is not None:
        state = broadcast_object(optimizer.state_dict() if hvd.rank() == root else None, root, "optimizer_state")
        if hvd.rank() != root:
            optimizer.load_state_dict(state)


COMPRESSION = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}


def distributed_optimizer(optimizer, model: torch.nn.Module, backward_passes_per_step: int = 1,
                          compression: str = "none"):
    """Horovod's DistributedOptimizer: one averaged allreduce per parameter every k backward passes.

    compression="fp16" sends each gradient as float16 and casts the average back (half the bytes).
    """
    return hvd.DistributedOptimizer(
        optimizer,
        named_parameters=model.named_parameters(),
        backward_passes_per_step=backward_passes_per_step,
        op=hvd.Average,
        compression=COMPRESSION[compression],
    )


def elastic_launch() -> bool:
    """Whether horovodrun started this process as an elastic job (--min-np/--max-np/discovery)."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


# Horovod's elastic state, subclassed by elastic.ElasticWorld. Not TorchState: its sync() calls
# hvd.broadcast_optimizer_state, which changes the weights under weight decay (see broadcast_state).
ElasticState = State


def run_elastic(func, state: ElasticState):
    """hvd.elastic.run: func(state), called again after every reset (Horovod re-initialized on the
    new set of workers; state restored to its last commit after a failure, then synced)."""
    return hvd.elastic.run(func)(state)


def discard_gradients(optimizer) -> None:
    """Complete the allreduces a failed step started, then drop the step's gradients on this rank.

    Horovod's synchronize() also submits the gradients this rank never reached, so ranks that
    finished their backward passes are not left waiting for them.
    """
    if hasattr(optimizer, "synchronize"):
        optimizer.synchronize()
        optimizer._synchronized = False  # Horovod 0.28.1: else the next step() warns about a double synchronize
    optimizer.zero_grad()


def scaled_step(optimizer, scaler) -> bool:
    """One optimizer step under a GradScaler (fp16): complete the allreduces once, unscale the averaged
    gradients, step unless they hold inf/NaN, update the scale. Returns whether the step was skipped.

    The averaged gradients are the same on every rank, so all ranks skip the same steps and keep the
    same scale. A plain optimizer (no `synchronize`) is stepped the same way, without the exchange.
    """
    before = scaler.get_scale()
    if hasattr(optimizer, "synchronize"):
        optimizer.synchronize()
        scaler.unscale_(optimizer)
        with optimizer.skip_synchronize():
            scaler.step(optimizer)
        optimizer._synchronized = False  # Horovod 0.28.1: a skipped step() would leave it set
    else:
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() < before  # update() backs the scale off exactly when it found inf/NaN


def barrier() -> None:
    hvd.barrier()


def shutdown() -> None:
    hvd.shutdown()
