"""The multi-process harness itself: results come back, failures come back with the
rank's traceback, and neither a crash nor a hang leaves processes behind."""

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers.dist_utils import RemoteTraceback, run_distributed


def _rank_and_sum(offset):
    x = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(x)
    return dist.get_rank() + offset, dist.get_world_size(), x.item()


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise KeyError("only rank one fails")
    dist.barrier()  # rank 0 waits for a peer that will never come


def _die_on_rank_two():
    if dist.get_rank() == 2:
        os._exit(3)
    dist.barrier()


def _hang():
    if dist.get_rank() == 0:
        time.sleep(60)
    dist.barrier()


def _no_children_left():
    deadline = time.monotonic() + 5
    while mp.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not mp.active_children()


def test_results_come_back_in_rank_order():
    assert run_distributed(3, _rank_and_sum, 10) == [(10, 3, 3.0), (11, 3, 3.0), (12, 3, 3.0)]


def test_exception_carries_rank_and_traceback():
    start = time.monotonic()
    with pytest.raises(KeyError, match="only rank one fails") as info:
        run_distributed(2, _fail_on_rank_one, timeout=30)
    assert time.monotonic() - start < 10  # rank 0, blocked in the barrier, is killed
    assert "raised on rank 1 of 2" in info.value.__notes__[0]
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback) and "_fail_on_rank_one" in str(cause)
    _no_children_left()


def test_crashed_rank_is_reported():
    with pytest.raises(RuntimeError, match="rank 2 exited with code 3 without a result"):
        run_distributed(3, _die_on_rank_two, timeout=30)
    _no_children_left()


def test_hang_times_out():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] of 2 did not finish within 2 s"):
        run_distributed(2, _hang, timeout=2)
    assert time.monotonic() - start < 8
    _no_children_left()
