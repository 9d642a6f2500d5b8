"""`paratron plan --check-communication`: "deadlock-free" for the layouts Paratron runs,
the circular wait with the two ranks' queues (exit 1) for a schedule that posts each
send and receive on its own."""

import pytest

from paratron.cli.plan import main as plan_main
from paratron.parallel import schedule_check
from paratron.parallel.pipeline import communication_groups

TINY = ("--num-layers 8 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--max-position-embeddings 16 --vocab-size 128 --micro-batch-size 1 "
        "--global-batch-size 16 --disable-bias-linear --check-communication").split()


@pytest.mark.parametrize("flags", [
    "--num-gpus 4 --pipeline-model-parallel-size 4 --num-virtual-stages-per-pipeline-rank 2",
    "--num-gpus 3 --pipeline-model-parallel-size 3 --decoder-first-pipeline-num-layers 2",
    "--num-gpus 8 --pipeline-model-parallel-size 2 --num-experts 4 "
    "--expert-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 2",
    "--num-gpus 2",
], ids=["pp4-vpp2", "pp3-uneven", "pp2-vpp2-ep2", "dp2"])
def test_paratron_layouts_are_deadlock_free(capsys, flags):
    assert plan_main(TINY + flags.split()) == 0
    assert capsys.readouterr().out.startswith("deadlock-free: ")


def test_unpaired_transfers_are_reported_with_both_queues(capsys, monkeypatch):
    def unpaired(order, chunks, warmup=None):
        return [(message,) for group in communication_groups(order, chunks, warmup)
                for message in sorted(group, key=lambda msg: msg.op == "recv")]

    monkeypatch.setattr(schedule_check, "communication_groups", unpaired)
    assert plan_main(TINY + "--num-gpus 2 --pipeline-model-parallel-size 2".split()) == 1
    headline, *queues = capsys.readouterr().out.splitlines()
    assert headline == "training: deadlock: circular wait rank 0 -> rank 1 -> rank 0"
    assert [line.split(":")[0] for line in queues] == ["  rank 0", "  rank 1"]
    assert queues[0].startswith("  rank 0: [send acti mb1 s0->s1 to rank 1] "
                                "[recv grad mb0 s1->s0 from rank 1]")


def test_a_layout_the_trainer_refuses_is_refused(capsys):
    assert plan_main(TINY + "--num-gpus 2 --pipeline-model-parallel-size 2 "
                            "--num-virtual-stages-per-pipeline-rank 2 "
                            "--global-batch-size 5".split()) == 2
    assert "multiple of --pipeline-model-parallel-size 2" in capsys.readouterr().err
