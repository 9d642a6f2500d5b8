"""Joining the job: one call that turns "I am process k of n" into torch.distributed.

The launcher says who this process is: torchrun (and the `pretrain_gpt.py` shim) through
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; other launchers through
--world-size, --rank and --init-method, which win over the environment. With CUDA each
process drives the GPU of its local rank and talks NCCL; without it, gloo on the CPU.
"""

from __future__ import annotations

import json
import contextlib
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
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
    once initialised only returns the device (and restarts this rank's heartbeat, so a
    job initialised elsewhere gets one too). The TP and CP sizes decide
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
        start_heartbeat()
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
    timeout = timedelta(minutes=timeout_minutes)
    store = _round_store(world_size, timeout) if init_method == "env://" else None
    dist.init_process_group(backend if use_cuda else "gloo",
                            init_method=None if store else init_method, store=store,
                            world_size=world_size, rank=rank, timeout=timeout,
                            device_id=device if use_cuda and backend == "nccl" else None)
    if store is not None:
        _mark_when_terminated()
    start_heartbeat()
    return device


# ------------------------------------------------------------------ restart rounds
# torchrun keeps its store across the rounds it restarts the workers in (the store of
# the static rendezvous is made once; with c10d rendezvous it is shared, see
# pytorch/pytorch#135712), and env:// hands the workers that store as it is. Gloo and
# NCCL publish each rank's address under fixed keys in it, so a restarted rank can read
# the address of the previous round's rank 0 and fail with "Connection refused". Each
# round therefore works under a prefix of its own. With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# (the elastic recipe: torchrun's shared store cannot take a node that joins, see the
# README) every round gets a fresh store of its own and there is nothing to keep apart,
# nor anything left of the previous round to read.
def restart_round() -> int:
    """Which of torchrun's restart rounds this is (0 for the first, or without torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    except ValueError:
        return 0


def _round_prefix(round_: int) -> str:
    return f"paratron/round_{round_}/"


_WORLD_KEY = "world_size"  # each round's, under its prefix


def _round_store(world_size: int, timeout: timedelta):
    """A client of torchrun's store under this round's prefix, or None when torchrun does
    not hand its workers its store (a launch by hand: env:// makes a fresh store)."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    round_store = dist.PrefixStore(_round_prefix(restart_round()), store)
    round_store.set(_WORLD_KEY, str(world_size))  # an elastic job's next round may differ
    return round_store


def _base_store():
    """The store under every prefix (torchrun's own, under torchrun), or None."""
    store = _store()
    return store._underlying_non_prefix_store if isinstance(store, dist.PrefixStore) else store


def _ended_key(round_: int, rank: int) -> str:
    return f"paratron/round_{round_}/ended/{rank}"


def mark_ended(rank: int, why: str) -> None:
    """Note that `rank` was alive when this round ended for it (an error it reported, or
    a signal: torchrun stops the other ranks when one dies), so that the next round can
    tell which rank died."""
    store = _base_store()
    if store is not None:
        with contextlib.suppress(Exception):
            store.set(_ended_key(restart_round(), rank), why)


def _mark_when_terminated() -> None:
    """Under torchrun: when the agent stops this rank (SIGTERM, because another one
    died), note it before going down as the signal would have taken it."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        return

    rank = dist.get_rank()

    def terminated(signum, frame):
        mark_ended(rank, signal.Signals(signum).name)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    signal.signal(signal.SIGTERM, terminated)


def previous_round_report() -> str | None:
    """For a restarted round: which ranks of the previous round ended without a word,
    that is, died (None in the first round)."""
    round_, store = restart_round(), _base_store()
    if round_ == 0:
        return None
    if store is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return f"torchrun restart round {round_}"  # the previous round's store is gone
    try:
        previous = dist.PrefixStore(_round_prefix(round_ - 1), store)
        if not previous.check([_WORLD_KEY]):  # a new store: its host was lost with its node
            return f"torchrun restart round {round_}"
        gone = [r for r in range(int(previous.get(_WORLD_KEY)))
                if not store.check([_ended_key(round_ - 1, r)])]
    except Exception:  # noqa: BLE001 - the report is a courtesy; never block a restart
        return f"torchrun restart round {round_}"
    who = (f"rank{'s' if len(gone) > 1 else ''} {', '.join(map(str, gone))} died"
           if gone else "every rank stopped on a signal or an error")
    return f"torchrun restart round {round_}: in the previous round {who}"


def launcher_rank() -> int:
    """This process's rank as the launcher's environment says (torchrun's RANK), before
    any process group exists; 0 for a process launched alone."""
    try:
        return int(os.environ.get("RANK", 0))
    except ValueError:
        return 0


def launched_world_size(world_size: int | None = None) -> int:
    """The processes of this launch as the settings are derived before any process group
    exists: torchrun's WORLD_SIZE, else `world_size` (--world-size), else 1."""
    return int(os.environ.get("WORLD_SIZE", world_size or 1))


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
# A rank that fails says so through the rendezvous store; a rank that dies or is stopped
# cannot, so every rank also beats a counter in the store from a daemon thread. When a
# collective fails or times out, the survivor reads both and names the culprit.
FAILED_KEY = "paratron/failed_rank"  # the first failure reported: "<rank>|<error>"
HEARTBEAT_S = 1.0    # how often a rank beats
SILENCE_S = 4.0      # a rank whose heartbeat stands still this long is gone or stopped
STORE_WAIT_S = 5.0   # how long one store call may block while explaining a failure


def _heartbeat_key(rank: int) -> str:
    return f"paratron/heartbeat/{rank}"


def _reported_key(rank: int) -> str:
    return f"paratron/failed/{rank}"


class PeerFailure(RuntimeError):
    """This rank stopped because another one failed; the message names that rank."""


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None


class _ForkGuard:
    """A lock held around every beat and, for at most STORE_WAIT_S, by a thread that
    forks (DataLoader workers are forked): a child forked while the heartbeat is inside
    the store's C++ client would inherit that client's locks held and wait on them
    forever. Fork hooks are process-wide by nature, hence one guard per process."""

    def __init__(self):
        self.lock, self.held = threading.Lock(), False
        os.register_at_fork(before=self.before_fork, after_in_parent=self.after_fork,
                            after_in_child=self.after_fork)

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()

    def before_fork(self) -> None:  # a beat stuck on a stopped store host must not block
        self.held = self.lock.acquire(timeout=STORE_WAIT_S)

    def after_fork(self) -> None:
        if self.held:
            self.held = False
            self.lock.release()


class _Heartbeat(threading.Thread):
    """Adds one to this rank's heartbeat counter every HEARTBEAT_S seconds.

    It talks through its own connection to the store: calls on one connection are
    serialised, and the main thread may block on it (waiting for a key while groups are
    built), which would otherwise silence a rank that is alive. It ends quietly when the
    process group is destroyed or the store goes away (its host rank died; that is
    explained by the survivors, not here). A stopped process stops its heartbeat too.
    """

    beating = _ForkGuard()

    def __init__(self, store, rank: int):
        super().__init__(name=f"paratron-heartbeat-{rank}", daemon=True)
        self.store, self.key, self.stopped = store, _heartbeat_key(rank), threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_S) and dist.is_initialized():
            try:
                with self.beating:
                    self.store.add(self.key, 1)
            except Exception:  # noqa: BLE001 - the store is gone; nothing left to tell
                return


def stop_heartbeat() -> None:
    """Stop this process's heartbeat (before the process group is destroyed)."""
    for thread in threading.enumerate():
        if isinstance(thread, _Heartbeat):
            thread.stopped.set()
            thread.join(HEARTBEAT_S)


def start_heartbeat() -> None:
    """Beat for this rank of the initialised job (none for a single process, or for a
    store that cannot open a second connection). The first beat is written before the
    thread starts: a rank with a counter is one whose silence means something."""
    stop_heartbeat()
    store = _store()
    if store is None or dist.get_world_size() == 1:
        return
    rank = dist.get_rank()
    try:
        store = store.clone()
        # Never time out: a beat that fails prints a c10d warning, and a store host that
        # is stopped is explained by the survivors' failure analysis, not here.
        store.set_timeout(timedelta(days=1))
        store.add(_heartbeat_key(rank), 1)
    except (RuntimeError, NotImplementedError):
        return
    _Heartbeat(store, rank).start()


def report_failure(rank: int, exc: BaseException, store) -> None:
    """Record this rank's failure, and make it the job's first one if no rank was earlier."""
    message = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
    mark_ended(rank, message)
    store.set(_reported_key(rank), message)
    store.compare_set(FAILED_KEY, "", f"{rank}|{message}")


def failed_rank(store) -> tuple[int, str] | None:
    """The rank that reported a failure first, and its error, if any did."""
    if not store.check([FAILED_KEY]):
        return None
    rank, message = store.get(FAILED_KEY).decode().split("|", 1)
    return int(rank), message


def silent_ranks(store, rank: int) -> list[int]:
    """The other ranks that neither beat within SILENCE_S nor reported a failure: they
    died or were stopped. Returns as soon as every other rank has shown a sign of life;
    ranks that never beat (no heartbeat on that rank) are not judged."""
    def beats(r):
        return int(store.add(_heartbeat_key(r), 0))

    def quiet(r):
        return beats(r) == seen[r] and not store.check([_reported_key(r)])

    seen = {r: beats(r) for r in range(dist.get_world_size()) if r != rank}
    waiting = [r for r, count in seen.items() if count > 0]
    deadline = time.monotonic() + SILENCE_S
    while waiting and time.monotonic() < deadline:
        time.sleep(HEARTBEAT_S / 2)
        waiting = [r for r in waiting if quiet(r)]
    return waiting


def explain_failure(rank: int, exc: BaseException) -> BaseException:
    """The error to raise on this rank: its own, or a PeerFailure naming the rank that
    made this one's collectives fail or time out (--distributed-timeout-minutes): one
    that died or was stopped without a word, else the first that reported a failure."""
    store = _store()
    if store is None:
        return exc
    timeout = store.timeout
    try:
        with _cpp_warnings_hidden():
            store.set_timeout(timedelta(seconds=STORE_WAIT_S))
            report_failure(rank, exc, store)
            silent = silent_ranks(store, rank)
            first = failed_rank(store)
    except RuntimeError:  # the store itself is unreachable (DistError is one)
        return _store_lost(rank, exc)
    finally:
        stop_heartbeat()  # this rank is done: its silence now means nothing
        try:
            store.set_timeout(timeout)
        except RuntimeError:
            pass
    if silent:
        names = ", ".join(map(str, silent))
        return PeerFailure(f"rank{'s' if len(silent) > 1 else ''} {names} stopped answering "
                           f"(no heartbeat for {SILENCE_S:g} s: the process died or is "
                           f"stopped); rank {rank} stopped waiting for it")
    if first is None or first[0] == rank:
        return exc
    return PeerFailure(f"rank {first[0]} failed ({first[1]}); rank {rank} stopped "
                       f"waiting for it")


def _store_lost(rank: int, exc: BaseException) -> BaseException:
    """The rendezvous store does not answer: under torchrun its agent holds it; launched
    by hand (--init-method, MASTER_ADDR) rank 0 does, so rank 0 is the one that is gone."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return PeerFailure(f"the rendezvous store (torchrun's agent) stopped answering; "
                           f"rank {rank} stopped")
    if rank == 0:
        return exc
    return PeerFailure(f"rank 0 stopped answering (the rendezvous store it hosts is "
                       f"unreachable: the process died or is stopped); rank {rank} stopped "
                       f"waiting for it")


@contextmanager
def _cpp_warnings_hidden():
    """Silence file descriptor 2 for the block. A store call that fails because its host
    is gone makes c10d print a warning with a C++ stack there, before Python sees the
    exception; the one line that explains the failure is all this rank should print."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextmanager
def failures_explained(rank: int):
    """Raise explain_failure's error for an exception of the block (multi-rank jobs)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised, naming the rank that failed
        raise explain_failure(rank, exc) from exc


def record_for_launcher(message: str) -> None:
    """Hand torchrun the line this rank printed before exiting with an error.

    torchrun's summary shows, as root cause, the failure with the earliest timestamp and
    the message of its TORCHELASTIC_ERROR_FILE (else only an exit code). A survivor that
    names a vanished rank writes it there, so the summary names that rank too.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as fh:
            # torch's ErrorHandler layout; the summary prints py_callstack as the traceback.
            json.dump({"message": {"message": message, "extraInfo": {
                "py_callstack": message, "timestamp": str(int(time.time()))}}}, fh)
    except OSError:
        pass
