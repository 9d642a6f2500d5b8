"""Joining the job: one call that turns "I am process k of n" into torch.distributed.

The launcher says who this process is: torchrun (and the `pretrain_gpt.py` shim) through
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; other launchers through
--world-size, --rank and --init-method, which win over the environment. With CUDA each
process drives the GPU of its local rank and talks NCCL; without it, gloo on the CPU.
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed(backend: str = "nccl", timeout_minutes: float = 10,
                     world_size: int | None = None, rank: int | None = None,
                     init_method: str | None = None,
                     local_rank: int | None = None,
                     tensor_model_parallel_size: int = 1,
                     context_parallel_size: int = 1) -> torch.device:
    """Initialise torch.distributed for this process and return its compute device.

    `backend` is honoured on GPUs; on a machine without CUDA the collectives run on gloo.
    One process with no job to join (no WORLD_SIZE, MASTER_ADDR or init_method)
    initialises nothing: the single-process layout needs no groups. Calling it again
    once initialised only returns the device. The TP and CP sizes decide
    CUDA_DEVICE_MAX_CONNECTIONS, which must be settled before this process's GPU is
    first touched.
    """
    env = os.environ
    world_size = int(env.get("WORLD_SIZE", 1)) if world_size is None else world_size
    rank = int(env.get("RANK", 0)) if rank is None else rank
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if torch.cuda.is_available():
        warning = set_cuda_device_max_connections(
            tensor_model_parallel_size, context_parallel_size, env,
            cuda_initialized=torch.cuda.is_initialized())
        if warning and rank == 0:
            warnings.warn(warning, stacklevel=2)
    device = _device(rank, local_rank)
    if dist.is_initialized():
        return device
    if init_method is None:
        if world_size == 1 and "MASTER_ADDR" not in env:
            return device
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise ValueError("set MASTER_ADDR and MASTER_PORT (torchrun does) or pass "
                             "--init-method tcp://host:port to join a job of "
                             f"{world_size} processes")
        init_method = "env://"
    use_cuda = device.type == "cuda"
    dist.init_process_group(backend if use_cuda else "gloo", init_method=init_method,
                            world_size=world_size, rank=rank,
                            timeout=timedelta(minutes=timeout_minutes),
                            device_id=device if use_cuda and backend == "nccl" else None)
    return device


CUDA_CONNECTIONS = "CUDA_DEVICE_MAX_CONNECTIONS"


def set_cuda_device_max_connections(tensor_model_parallel_size: int,
                                    context_parallel_size: int, env=os.environ, *,
                                    cuda_initialized: bool = False) -> str | None:
    """Give TP and CP collectives one hardware queue per GPU, as Megatron does.

    With a single connection the GPU runs kernels in the order they were queued, so a
    tensor- or context-parallel communication kernel queued before a GEMM starts
    before it and the two overlap. The driver reads the variable when the CUDA context
    is created, so it is set here (when unset and TP or CP > 1) before the GPU is
    touched. Returns a one-line warning when it is set to something else, or when it
    came too late, and None when all is well.
    """
    if tensor_model_parallel_size == 1 and context_parallel_size == 1:
        return None
    value = env.get(CUDA_CONNECTIONS)
    if value is None and not cuda_initialized:
        env[CUDA_CONNECTIONS] = "1"
        return None
    if value is None:
        return (f"{CUDA_CONNECTIONS} is unset and CUDA is already initialised, so it cannot "
                f"take effect; export {CUDA_CONNECTIONS}=1 before launching for TP/CP overlap")
    if value.strip() != "1":
        return (f"{CUDA_CONNECTIONS}={value} with tensor/context parallelism: communication "
                f"may not overlap computation; export {CUDA_CONNECTIONS}=1 (Megatron's setting)")
    return None


def _device(rank: int, local_rank: int | None) -> torch.device:
    """The GPU of this process's local rank (LOCAL_RANK, else rank modulo the GPUs of
    this machine), made current; the CPU without CUDA."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", rank % count))
    if local_rank >= count:
        raise ValueError(f"local rank {local_rank} has no GPU: this machine has {count}")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


# ---------------------------------------------------------------------- failures
FAILED_KEY = "paratron/failed_rank"


class PeerFailure(RuntimeError):
    """This rank stopped because another one failed; the message names that rank."""


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None


def report_failure(rank: int, exc: BaseException) -> None:
    """Write the first failure of the job to the rendezvous store, for the other ranks."""
    store = _store()
    if store is None:
        return
    message = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
    try:
        store.compare_set(FAILED_KEY, "", f"{rank}|{message}")
    except RuntimeError:  # the store lived on a rank that is gone
        pass


def failed_rank() -> tuple[int, str] | None:
    """The rank that reported a failure first, and its error, if any did."""
    store = _store()
    try:
        if store is None or not store.check([FAILED_KEY]):
            return None
        rank, message = store.get(FAILED_KEY).decode().split("|", 1)
        return int(rank), message
    except (RuntimeError, ValueError):
        return None


def explain_failure(rank: int, exc: BaseException) -> BaseException:
    """The error to raise on this rank: its own, or a PeerFailure naming the rank whose
    failure made this one's collectives fail or time out (--distributed-timeout-minutes)."""
    first = failed_rank()
    if first is None:
        report_failure(rank, exc)
        first = failed_rank()
    if first is None or first[0] == rank:
        return exc
    return PeerFailure(f"rank {first[0]} failed ({first[1]}); rank {rank} stopped "
                       f"waiting for it")
