"""The schedule checker under NCCL's semantics: every schedule Paratron runs is
deadlock-free and matched pair by pair (PP 2/4/8, VPP 1-4, 1-16 micro-batches, uneven
stages, PP x EP), what the executor really posts is what the checker checks, and the
order Paratron used to post (each send and each receive a batch of its own) waits in a
circle on NCCL, where gloo buffered it."""

from collections import Counter

import pytest
import torch
import torch.distributed as dist

from paratron.parallel import schedule_check
from paratron.parallel.pipeline import (StageIO, communication_groups, model_chunks,
                                        run_schedule, schedule)
from paratron.parallel.process_groups import Dimension, ProcessGroups
from paratron.parallel.schedule_check import (Op, check_communication, find_problem,
                                              pipeline_queues)

ACCEPTED = [(pp, vpp, micro) for pp in (2, 4, 8) for vpp in (1, 2, 3, 4)
            for micro in range(1, 17) if vpp == 1 or micro % pp == 0]


def _unpaired(queues):
    """The old posting: each send batched alone as soon as it exists, each receive alone
    just before the step that needs it."""
    return {rank: [(op,) for group in queue for op in sorted(group, key=lambda o: o.op == "recv")]
            for rank, queue in queues.items()}


def _unpaired_groups(order, chunks, warmup=None):
    return [(message,) for group in communication_groups(order, chunks, warmup)
            for message in sorted(group, key=lambda msg: msg.op == "recv")]


# ---------------------------------------------------------------------- the model of NCCL
def _send(peer, what="x"):
    return Op("send", peer, ("activation", what, 0, 1))


def _recv(peer, what="x"):
    return Op("recv", peer, ("activation", what, 0, 1))


def test_matched_exchange_in_one_group_runs():
    assert find_problem({0: [(_send(1), _recv(1))], 1: [(_send(0), _recv(0))]}) is None


def test_two_sends_ahead_of_their_receives_wait_in_a_circle():
    problem = find_problem({0: [(_send(1),), (_recv(1),)], 1: [(_send(0),), (_recv(0),)]})
    assert problem.startswith("deadlock: circular wait rank 0 -> rank 1 -> rank 0")
    assert len(problem.splitlines()) == 3  # the headline and one queue line per rank


def test_transfers_matched_out_of_order_are_a_mismatch():
    problem = find_problem({0: [(_send(1, 0),), (_send(1, 1),)],
                            1: [(_recv(0, 1),), (_recv(0, 0),)]})
    assert problem.startswith("mismatch: rank 0's operation 1 with rank 1 is 'send acti "
                              "mb0 s0->s1 to rank 1', rank 1's is 'recv acti mb1 s0->s1 "
                              "from rank 0'")
    assert [line.split(":")[0] for line in problem.splitlines()[1:]] == ["  rank 0", "  rank 1"]


def test_empty_groups_and_collectives_run():
    everyone = (0, 1)
    a2a = Op("all-to-all", everyone, ("F", 0, 0))
    assert find_problem({0: [(), (a2a,), (_send(1),)], 1: [(a2a,), (), (_recv(0),)]}) is None


def test_a_collective_behind_a_transfer_its_peer_waits_for_is_a_deadlock():
    a2a = Op("all-to-all", (0, 1), ("F", 0, 0))
    problem = find_problem({0: [(_recv(1),), (a2a,)], 1: [(a2a,), (_send(0),)]})
    assert problem.startswith("deadlock: circular wait rank 0 -> rank 1 -> rank 0")


def test_a_send_nobody_receives_is_a_mismatch():
    assert find_problem({0: [(_send(1),)], 1: []}).startswith("mismatch")


# ---------------------------------------------------------------------- Paratron's schedules
@pytest.mark.parametrize("pp, vpp, micro", ACCEPTED)
def test_every_schedule_paratron_runs_is_deadlock_free(pp, vpp, micro):
    assert check_communication(pp, vpp, micro) is None


@pytest.mark.parametrize("num_layers, pp, vpp, split", [
    (10, 4, 1, dict(first=1, last=3)),
    (27, 4, 1, dict(first=6)),
    (8, 3, 2, dict(first=4)),
    (3, 4, 1, dict(account_for_embedding=True)),   # a first stage with the embedding only
    (7, 4, 1, dict(account_for_loss=True)),
    (7, 2, 2, dict(account_for_embedding=True)),
])
def test_uneven_stages_are_deadlock_free(num_layers, pp, vpp, split):
    for micro in range(pp, 17, pp):
        assert check_communication(pp, vpp, micro, chunks_of=lambda rank: model_chunks(
            num_layers, pp, rank, vpp, **split)) is None


@pytest.mark.parametrize("pp, vpp, ep", [(2, 1, 2), (2, 2, 2), (4, 1, 2), (4, 2, 4),
                                         (8, 2, 2), (2, 4, 4)])
def test_expert_all_to_alls_match_within_each_stage(pp, vpp, ep):
    for micro in (pp, 2 * pp):
        assert check_communication(pp, vpp, micro, ep=ep) is None
    queues = pipeline_queues(pp, vpp, 2 * pp, ep=ep)
    assert len(queues) == pp * ep
    assert sum(op.op == "all-to-all" for group in queues[0] for op in group) == 2 * 2 * pp * vpp


def test_an_expert_rank_out_of_step_is_a_mismatch():
    queues = pipeline_queues(2, 1, 4, ep=2)
    steps = [i for i, group in enumerate(queues[1]) if group[0].op == "all-to-all"]
    a, b = steps[1], steps[2]
    queues[1][a], queues[1][b] = queues[1][b], queues[1][a]
    problem = find_problem(queues)
    assert problem.startswith("mismatch") and "all-to-all" in problem


def test_gradients_and_activations_share_a_pair_in_the_same_order():
    """PP2 interleaved: rank 1 sends rank 0 both activations (into chunk 1) and
    gradients (into chunk 0); NCCL has no tags, so swapping two of them is caught."""
    queues = pipeline_queues(2, 2, 4)
    sends = [i for i, group in enumerate(queues[1]) if any(op.op == "send" for op in group)]
    kinds = {i: {op.what[0] for op in queues[1][i] if op.op == "send"} for i in sends}
    a = next(i for i in sends if kinds[i] == {"activation"})
    b = next(i for i in sends if kinds[i] == {"gradient"})
    queues[1][a], queues[1][b] = queues[1][b], queues[1][a]
    assert find_problem(queues).startswith("mismatch")


# ---------------------------------------------------------------------- the old order
@pytest.mark.parametrize("pp, vpp, micro", [(2, 1, 4), (4, 1, 8), (8, 1, 16), (2, 2, 4),
                                            (4, 2, 8), (4, 4, 16)])
def test_unpaired_sends_and_receives_wait_in_a_circle(pp, vpp, micro):
    queues = pipeline_queues(pp, vpp, micro)
    assert find_problem(queues) is None
    problem = find_problem(_unpaired(queues))
    assert problem.startswith("deadlock: circular wait"), problem


def test_an_unsafe_schedule_is_refused_before_the_first_step(monkeypatch):
    pg, chunks = ProcessGroups.sizes_only(2, pp=(2, 0)), model_chunks(4, 2, 0)
    schedule_check.refuse_unsafe_schedule(pg, len(chunks), 4)
    monkeypatch.setattr(schedule_check, "communication_groups", _unpaired_groups)
    with pytest.raises(RuntimeError, match="unsafe on NCCL; training: deadlock"):
        schedule_check.refuse_unsafe_schedule(pg, len(chunks), 4)


# ---------------------------------------------------------------------- the executor
class _Work:
    def wait(self):
        return True


class _P2POp:
    """`dist.P2POp` without a process group to check against."""

    def __init__(self, op, tensor, peer, group=None, tag=0):
        self.op, self.tensor, self.peer = op, tensor, peer


def _record_posts(pp, rank, vpp, micro, forward_only, monkeypatch):
    """What `run_schedule` hands `batch_isend_irecv` on one rank of a toy stack, recorded
    instead of sent: [((op, peer), ...) per batch]."""
    posts = []

    def record(ops):
        posts.append(tuple(("send" if op.op is dist.isend else "recv", op.peer) for op in ops))
        return [_Work() for _ in ops]

    monkeypatch.setattr(dist, "batch_isend_irecv", record)
    monkeypatch.setattr(dist, "P2POp", _P2POp)
    pg = ProcessGroups(pp=Dimension(pp, rank), pp_ranks=tuple(range(pp)), world_size=pp)
    chunks = model_chunks(pp * vpp, pp, rank, vpp)

    def forward(c, m, x):
        return (torch.ones(2, requires_grad=True) if x is None else x) * 2

    order, warmup = schedule(pp, rank, micro, vpp, forward_only)
    run_schedule(order, chunks, pg, forward, lambda m, y: y.sum(),
                 StageIO((2,), torch.float32, torch.device("cpu")),
                 forward_only=forward_only, **({} if warmup is None else dict(warmup=warmup)))
    return posts


@pytest.mark.parametrize("forward_only", [False, True], ids=["train", "evaluate"])
@pytest.mark.parametrize("pp, vpp, micro", [(2, 1, 1), (2, 1, 5), (4, 1, 3), (4, 1, 8),
                                            (8, 1, 16), (2, 2, 4), (4, 2, 4), (4, 2, 8),
                                            (4, 3, 8), (8, 4, 8), (2, 4, 6)])
def test_what_the_executor_posts_is_checked_and_safe(pp, vpp, micro, forward_only,
                                                    monkeypatch):
    checked = pipeline_queues(pp, vpp, micro, forward_only=forward_only)
    recorded = {}
    for rank in range(pp):
        posts = _record_posts(pp, rank, vpp, micro, forward_only, monkeypatch)
        assert [sorted(group) for group in posts] == [
            sorted((op.op, op.peer) for op in group) for group in checked[rank]], rank
        recorded[rank] = posts
    assert find_problem(_numbered(recorded)) is None


def _numbered(posts_by_rank):
    """Recorded batches as the checker's queues, each transfer named by its place on its
    channel (what the two sides agree on when the counts match): only the order of the
    batches is under test."""
    queues = {}
    for rank, posts in posts_by_rank.items():
        count, queue = Counter(), []
        for group in posts:
            for op, peer in group:
                count[op, peer] += 1
            queue.append(tuple(Op(op, peer, ("activation", count[op, peer], 0, 0))
                               for op, peer in group))
        queues[rank] = queue
    return queues
