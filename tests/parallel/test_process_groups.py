"""The process grid: Megatron-LM's rank order tp-cp-ep-dp-pp, the groups `build` creates,
refusals of sizes that do not divide, and joining a job with `init_distributed`."""

import itertools
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist

from tests.helpers.dist_utils import run_distributed
from paratron.parallel.launch import init_distributed
from paratron.parallel.process_groups import (ORDER, ProcessGroups, check_layout, layout,
                                              rank_groups)

# world 8 = TP 2 x DP 2 x PP 2, written out by hand.
TP2_PP2 = {
    "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
    "cp": [[0], [1], [2], [3], [4], [5], [6], [7]],
    "dp": [[0, 2], [1, 3], [4, 6], [5, 7]],
    "dp_cp": [[0, 2], [1, 3], [4, 6], [5, 7]],
    "pp": [[0, 4], [1, 5], [2, 6], [3, 7]],
    "mp": [[0, 1, 4, 5], [2, 3, 6, 7]],
    "embedding": [[0, 4], [1, 5], [2, 6], [3, 7]],
    "ep": [[0], [1], [2], [3], [4], [5], [6], [7]],
    "etp": [[0, 1], [2, 3], [4, 5], [6, 7]],
    "edp": [[0, 2], [1, 3], [4, 6], [5, 7]],
}

# world 8 = TP 2 x CP 2 x DP 2 for attention; experts: ETP 2 x EP 2 x EDP 2, EP taking
# CP's place in the order.
TP2_CP2_EP2 = {
    "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
    "cp": [[0, 2], [1, 3], [4, 6], [5, 7]],
    "dp": [[0, 4], [1, 5], [2, 6], [3, 7]],
    "dp_cp": [[0, 2, 4, 6], [1, 3, 5, 7]],
    "pp": [[0], [1], [2], [3], [4], [5], [6], [7]],
    "mp": [[0, 1], [2, 3], [4, 5], [6, 7]],
    "embedding": [[0], [1], [2], [3], [4], [5], [6], [7]],
    "ep": [[0, 2], [1, 3], [4, 6], [5, 7]],
    "etp": [[0, 1], [2, 3], [4, 5], [6, 7]],
    "edp": [[0, 4], [1, 5], [2, 6], [3, 7]],
}

# world 16 = TP 2 x PP 4 (DP 2), experts ETP 1 x EP 2 (EDP 2).
TP2_PP4_EP2_ETP1 = {
    "tp": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]],
    "dp": [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]],
    "pp": [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]],
    "embedding": [[0, 12], [1, 13], [2, 14], [3, 15]],
    "ep": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]],
    "etp": [[r] for r in range(16)],
    "edp": [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]],
}

LAYOUTS = {"tp2_pp2": (dict(tp=2, pp=2), TP2_PP2),
           "tp2_cp2_ep2": (dict(tp=2, pp=1, cp=2, ep=2), TP2_CP2_EP2)}


def test_tp2_pp2_rank_lists():
    assert layout(8, tp=2, pp=2) == TP2_PP2


def test_tp2_cp2_ep2_rank_lists():
    assert layout(8, tp=2, pp=1, cp=2, ep=2) == TP2_CP2_EP2


def test_expert_tensor_parallel_size_rank_lists():
    groups = layout(16, tp=2, pp=4, ep=2, etp=1)
    assert {k: groups[k] for k in TP2_PP4_EP2_ETP1} == TP2_PP4_EP2_ETP1


def _by_coordinates(sizes, dims):
    """Groups built from first principles: rank = sum(coordinate x stride) with TP the
    fastest; ranks that agree on every coordinate outside `dims` form one group."""
    names = list(ORDER)
    strides = [math.prod(sizes[n] for n in names[:i]) for i in range(len(names))]
    groups = {}
    for coords in itertools.product(*(range(sizes[n]) for n in names)):
        rank = sum(c * s for c, s in zip(coords, strides))
        outside = tuple(c for n, c in zip(names, coords) if n not in dims)
        groups.setdefault(outside[::-1], []).append(rank)
    return [sorted(g) for _, g in sorted(groups.items())]


@pytest.mark.parametrize("sizes", [dict(tp=2, cp=1, ep=1, dp=3, pp=2),
                                   dict(tp=4, cp=2, ep=1, dp=2, pp=1),
                                   dict(tp=1, cp=1, ep=4, dp=2, pp=3),
                                   dict(tp=2, cp=3, ep=1, dp=1, pp=2)])
def test_rank_groups_match_coordinates(sizes):
    for r in range(1, len(ORDER) + 1):
        for dims in itertools.combinations(ORDER, r):
            assert rank_groups(sizes, dims) == _by_coordinates(sizes, dims), dims


@pytest.mark.parametrize("world, sizes, message", [
    (8, dict(tp=3, pp=1), "world size 8 is not divisible by TP 3 x CP 1 x PP 1 = 3"),
    (8, dict(tp=2, pp=3), "world size 8 is not divisible by TP 2 x CP 1 x PP 3 = 6"),
    (12, dict(tp=2, pp=1, cp=4), "not divisible by TP 2 x CP 4 x PP 1 = 8"),
    (8, dict(tp=2, pp=1, ep=8), "not divisible by expert TP 2 x EP 8 x PP 1 = 16"),
    (6, dict(tp=1, pp=1, ep=4), "not divisible by expert TP 1 x EP 4 x PP 1 = 4"),
    (8, dict(tp=2, pp=1, ep=2, etp=3), "not divisible by expert TP 3 x EP 2"),
    (8, dict(tp=0, pp=1), "--tensor-model-parallel-size must be a positive integer"),
])
def test_refuses_sizes_that_do_not_divide(world, sizes, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")) as info:
        check_layout(world, **sizes)
    assert "\n" not in str(info.value)


def test_check_layout_returns_data_parallel_sizes():
    assert check_layout(16, tp=2, pp=2, cp=2) == (2, 4)
    assert check_layout(16, tp=2, pp=2, ep=4, etp=1) == (4, 2)


def test_single_process_layout():
    pg = ProcessGroups.single()
    assert (pg.tp.size, pg.cp.size, pg.dp.size, pg.pp.size, pg.ep.size, pg.edp.size) == \
        (1, 1, 1, 1, 1, 1)
    assert pg.is_first_stage and pg.is_last_stage and pg.tp.group is None
    assert ProcessGroups.build(1, 1) == pg  # no torch.distributed needed at size 1
    with pytest.raises(ValueError):
        ProcessGroups.build(2, 1)


def _check_built_groups():
    rank = dist.get_rank()
    for sizes, expected in LAYOUTS.values():
        pg = ProcessGroups.build(**sizes)
        assert (pg.rank, pg.world_size) == (rank, 8)
        for name, groups in expected.items():
            mine = next(g for g in groups if rank in g)
            if name == "embedding":
                assert pg.embedding_ranks == tuple(mine)
                group = pg.embedding_group
            else:
                assert (getattr(pg, name).size, getattr(pg, name).rank) == \
                    (len(mine), mine.index(rank)), name
                group = getattr(pg, name).group
            assert dist.get_process_group_ranks(group) == mine, name
            # The group really connects these ranks: a sum of global ranks over it.
            total = torch.tensor([float(rank)])
            dist.all_reduce(total, group=group)
            assert total.item() == sum(mine), name
        assert pg.pp_ranks == tuple(next(g for g in expected["pp"] if rank in g))
        assert pg.is_first_stage == (pg.pp.rank == 0)
        assert pg.is_last_stage == (pg.pp.rank == pg.pp.size - 1)
    # Non-dividing sizes are refused before any group exists.
    made = []
    original, dist.new_group = dist.new_group, lambda *a, **k: made.append(a)
    try:
        with pytest.raises(ValueError, match="world size 8 is not divisible by TP 3"):
            ProcessGroups.build(3, 1)
        with pytest.raises(ValueError, match="expert TP 2 x EP 8"):
            ProcessGroups.build(2, 1, ep=8)
    finally:
        dist.new_group = original
    assert made == []


def test_build_world_8():
    run_distributed(8, _check_built_groups)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_again(port_tcp, port_env):
    """Leave the harness's group and join with init_distributed: first with explicit
    arguments (as --world-size/--rank/--init-method give them), then from torchrun's
    environment variables."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.destroy_process_group()
    # nccl is asked for, as by default; without CUDA gloo is what runs.
    device = init_distributed("nccl", 1, world_size=world, rank=rank,
                              init_method=f"tcp://127.0.0.1:{port_tcp}")
    assert device == torch.device("cpu") and dist.get_backend() == "gloo"
    assert (dist.get_rank(), dist.get_world_size()) == (rank, world)
    x = torch.ones(1)
    dist.all_reduce(x)
    assert x.item() == world
    assert init_distributed("gloo", 1) == device  # already joined: nothing to do
    dist.destroy_process_group()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port_env))
    init_distributed("gloo", 1)
    assert (dist.get_rank(), dist.get_world_size()) == (rank, world)
    dist.barrier()


def test_init_distributed_from_arguments_and_environment():
    run_distributed(2, _join_again, _free_port(), _free_port())


def test_init_distributed_refusals(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        init_distributed("gloo", 1, world_size=2, rank=2)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_distributed("gloo", 1, world_size=2, rank=0)
    assert not dist.is_initialized()
    # One process and no job to join: nothing is initialised.
    assert init_distributed("nccl", 1) == torch.device("cpu")
    assert not dist.is_initialized()
