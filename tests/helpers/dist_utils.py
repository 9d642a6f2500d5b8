"""Run a test function on several CPU processes joined in one gloo group.

    results = run_distributed(4, check_something, arg1, arg2, timeout=60)

`fn(*args)` runs on every rank after `torch.distributed` is initialised (gloo, world
`world_size`, rank from `dist.get_rank()`); the per-rank return values come back as a
list. An exception on any rank is raised again here, carrying the rank's traceback; a
rank that dies or a run that outlives `timeout` kills every rank and fails the test.
Nothing is left running either way.

Processes come from a fork server that has imported torch once, so starting eight ranks
costs a fraction of a second instead of eight imports of torch. `fn` and its arguments
must be picklable (a module-level function of a test module). The rendezvous store
lives in this process on a port the OS picks, so concurrent runs cannot collide.
"""

from __future__ import annotations

import pickle
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# What every rank imports anyway; torch.distributed.tensor is what assert_close imports
# on its first call (a second per rank otherwise).
_PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "torch.testing", "pytest",
            "paratron.parallel.tensor_parallel"]


class RemoteTraceback(Exception):
    """The traceback of an exception raised on another rank (shown as its cause)."""

    def __str__(self) -> str:
        return self.args[0]


def _context():
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return mp.get_context("spawn")


def _worker(rank: int, world_size: int, port: int, timeout: float, conn, fn, args) -> None:
    try:
        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                              timeout=timedelta(seconds=timeout))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        conn.send(("ok", fn(*args)))
    except BaseException as error:  # noqa: BLE001 - everything goes back to the test
        text = traceback.format_exc()
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:
            error = RuntimeError(f"{type(error).__name__}: {error}")
        conn.send(("error", error, text))
        # Stay: exiting now would make peers blocked in a collective fail with "connection
        # closed" and hide this error among theirs. The parent kills every rank.
        _wait_for_parent(conn)
        return
    # Leave only when every rank is done, so no peer sees this one vanish mid-collective.
    _wait_for_parent(conn)
    dist.destroy_process_group()


def _wait_for_parent(conn) -> None:
    try:
        conn.recv()
    except EOFError:
        pass


def run_distributed(world_size: int, fn, *args, timeout: float = 60.0) -> list:
    """fn(*args) on `world_size` gloo ranks; returns [result of rank 0, rank 1, ...]."""
    ctx = _context()
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True,
                          wait_for_workers=False, timeout=timedelta(seconds=timeout))
    conns, procs = [], []
    try:
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, daemon=True, name=f"rank{rank}",
                               args=(rank, world_size, store.port, timeout, child, fn, args))
            proc.start()
            child.close()
            conns.append(parent)
            procs.append(proc)
        results, errors = _collect(conns, procs, timeout)
        if errors:
            # A rank that died, else the first error to arrive: the others may be echoes
            # of it (peers of a dead rank fail with "connection closed").
            died = [r for r, (_, text) in errors.items() if not text]
            rank = died[0] if died else next(iter(errors))
            error, text = errors[rank]
            others = sorted(set(errors) - {rank})
            error.add_note(f"raised on rank {rank} of {world_size}"
                           + (f" (ranks {others} failed too)" if others else ""))
            raise error from RemoteTraceback(f"rank {rank}:\n{text}")
        for conn in conns:
            conn.send("exit")
        for proc in procs:
            proc.join(10)
        return [results[rank] for rank in range(world_size)]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        for conn in conns:
            conn.close()


def _collect(conns, procs, timeout: float):
    """Wait for every rank's result; after the first error give the others a moment to
    report theirs, then stop (they may be blocked on the failed rank)."""
    deadline = time.monotonic() + timeout
    results, errors = {}, {}
    waiting = {conn: rank for rank, conn in enumerate(conns)}
    sentinels = {proc.sentinel: rank for rank, proc in enumerate(procs)}
    while waiting:
        if errors:
            deadline = min(deadline, time.monotonic() + 0.5)
        left = deadline - time.monotonic()
        ready = wait(list(waiting) + [s for s, r in sentinels.items() if r in waiting.values()],
                     timeout=max(left, 0))
        if not ready:
            if errors:
                break
            raise TimeoutError(f"ranks {sorted(waiting.values())} of {len(conns)} did not "
                               f"finish within {timeout:g} s (results from ranks "
                               f"{sorted(results)}, errors from {sorted(errors)})")
        for obj in ready:
            rank = waiting.get(obj, sentinels.get(obj))
            conn = conns[rank]
            if conn not in waiting:
                continue
            if obj is conn or conn.poll():
                try:
                    message = conn.recv()
                except EOFError:
                    message = None
            else:
                message = None
            if message is None:
                procs[rank].join(1)
                errors[rank] = (RuntimeError(f"rank {rank} exited with code "
                                             f"{procs[rank].exitcode} without a result"), "")
            elif message[0] == "ok":
                results[rank] = message[1]
            else:
                errors[rank] = (message[1], message[2])
            del waiting[conn]
    return results, errors
