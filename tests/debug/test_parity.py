"""`paratron parity`: the parallel layouts are equal to one process module by module on
tiny dense, MLA and MoE models; a fault injected in one place is named there (module and
direction); bad input is refused in one line before any process starts."""

import numpy as np
import pytest
import torch

from paratron.cli.main import main
from paratron.debug.compare import _activation
from paratron.debug.parity import check_parity
from paratron.debug.recorder import DIRECTION
from paratron.debug.workers import FAULT_ENV
from paratron.parallel.context_parallel import split_for_context_parallel
from paratron.parallel.sharding import ParamLayout, shard_tensor

COMMON = ("--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
          "--max-position-embeddings 16 --lr 2e-3 --vocab-size 120 --padded-vocab-size 128 "
          "--device cpu --micro-batch-size 2 --global-batch-size 8 --eval-interval 1000 "
          "--eval-iters 0 --log-interval 1000 --hidden-dropout 0 --attention-dropout 0 "
          "--adam-eps 1e-4 --num-workers 0 --train-iters 2 --mock-data --swiglu "
          "--normalization RMSNorm --position-embedding-type rope --disable-bias-linear "
          "--untie-embeddings-and-output-weights").split()
GQA = "--group-query-attention --num-query-groups 2 --qk-layernorm".split()
MLA = ("--multi-latent-attention --kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 "
       "--v-head-dim 8 --q-lora-rank 12").split()
MOE = GQA + ("--num-experts 4 --moe-ffn-hidden-size 16 --moe-router-topk 2 "
             "--moe-aux-loss-coeff 0.01 --moe-token-dispatcher-type alltoall").split()
DENSE_LAYOUTS = ["tp2 sp", "pp2 vpp2", "cp2", "dp2 distopt"]
MODELS = {"dense": (GQA, DENSE_LAYOUTS), "mla": (MLA, DENSE_LAYOUTS),
          "moe": (MOE, DENSE_LAYOUTS + ["ep2 tp2"])}


def _quiet(line):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("model", list(MODELS))
def test_layouts_equal_one_process(model):
    extra, layouts = MODELS[model]
    reports = check_parity(COMMON + extra, layouts, iterations=2, log=_quiet)
    for report in reports:
        assert report.first is None, report.verdict()
        assert report.verdict().endswith("equal within 5e-05")
        phases = {d.key.phase for d in report.differences}
        assert phases == {"forward", "backward", "grad", "weight"}
    if model == "moe":  # the stacked experts are compared gathered over EP
        names = {d.key.module for d in reports[-1].differences if d.key.phase == "weight"}
        assert "decoder.layers.3.mlp.experts.linear_fc1" in names
        for report in reports:  # 4 MoE layers x 2 iterations, every token routed alike
            assert len(report.expert_load) == 8
            assert all(line.endswith("routed alike") for line in report.expert_load)
            assert " moe layer 3 | tokens per expert min: " in report.expert_load[-1]


@pytest.mark.slow
def test_fp64_layouts_equal_one_process_to_1e_10():
    """--fp64 sums split over ranks agree with whole ones to ~1e-16 (measured: 1e-15 at
    TP2 + SP and CP2, 0 at DP2), so parity checks at 1e-10 by default."""
    reports = check_parity(COMMON + GQA + ["--fp64"], ["tp2 sp", "cp2", "dp2 distopt"],
                           iterations=2, log=_quiet)
    for report in reports:
        assert report.first is None, report.verdict()
        assert report.verdict().endswith("equal within 1e-10")


# fault, layout, extra flags, (module prefix, direction) that parity must name
FAULTS = {
    "drop_attention_all_reduce": (
        "tp2", [], ("decoder.layers.1.self_attention.linear_proj", "forward")),
    "skip_sequence_parallel_norm_grads": (
        "tp2 sp", [], ("decoder.layers.0.input_layernorm", "backward")),
    "dropout_from_model_parallel_stream": (
        "tp2", ["--hidden-dropout", "0.1"], ("decoder.layers.0.", "forward")),
    "reverse_activation_send": ("pp2", [], ("decoder.layers.2.", "forward")),
    "reverse_gradient_send": ("pp2", [], ("decoder.layers.1.", "backward")),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_is_named(fault, monkeypatch):
    layout, extra, (module, direction) = FAULTS[fault]
    flags = COMMON + GQA + extra
    [healthy] = check_parity(flags, [layout], iterations=1, log=_quiet)
    assert healthy.first is None, healthy.verdict()
    monkeypatch.setenv(FAULT_ENV, f"tests.debug.faults:{fault}")
    [report] = check_parity(flags, [layout], iterations=1, log=_quiet)
    first = report.first
    assert first is not None
    assert first.key.module.startswith(module), report.verdict()
    assert DIRECTION[first.key.phase] == direction, report.verdict()
    assert (first.key.iteration, first.key.micro) in ((1, 0), (1, -1)), report.verdict()


@pytest.mark.slow
def test_command_prints_the_table_and_exits_by_the_verdict(monkeypatch, capsys):
    args = ["parity", *COMMON, *GQA, "--layouts", "tp2", "--steps", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "decoder.layers.1.self_attention.linear_proj" in out
    assert out.rstrip().endswith("tp2: equal within 5e-05")
    monkeypatch.setenv(FAULT_ENV, "tests.debug.faults:drop_attention_all_reduce")
    assert main(args) == 1
    out = capsys.readouterr().out
    assert ("tp2: first difference beyond 5e-05: decoder.layers.1.self_attention.linear_proj "
            "(forward: output), iteration 1, micro-batch 0: relative difference") in out


@pytest.mark.parametrize("args,message", [
    (["--layouts", "tp2 xp2"], "layout 'tp2 xp2': unknown token 'xp2'"),
    (["--layouts", "tp3"], "layout 'tp3': "),
    (["--layouts", "pp3"], "layout 'pp3': "),
    (["--layouts", "tp2", "--tensor-model-parallel-size", "2"],
     "--tensor-model-parallel-size is a layout setting"),
    (["--layouts", "tp2", "--load", "/nonexistent/parity-ckpt"],
     "--load /nonexistent/parity-ckpt: no such folder"),
    (["--layouts", "tp2", "--steps", "0"], "--steps 0: give at least 1"),
    (["--steps", "2"], "the following arguments are required: --layouts"),
])
def test_bad_input_is_one_line(args, message, capsys):
    assert main(["parity", *COMMON, *GQA, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("paratron parity: error: ") and message in err, err
    assert err.count("\n") == 1, err


def test_empty_load_folder_is_refused(tmp_path, capsys):
    assert main(["parity", *COMMON, *GQA, "--layouts", "tp2", "--load", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--load {tmp_path}: no checkpoint in this folder" in err, err


@pytest.mark.slow
def test_layout_from_a_loaded_checkpoint(tmp_path):
    """--load: every run starts from the checkpoint's weights, optimizer and data position
    (iterations numbered on from it)."""
    flags = COMMON + GQA
    assert main(["train", *flags, "--train-iters", "1", "--save", str(tmp_path)]) == 0
    [report] = check_parity(flags + ["--train-iters", "3", "--load", str(tmp_path)],
                            ["tp2 sp"], iterations=1, log=_quiet)
    assert report.first is None, report.verdict()
    assert {d.key.iteration for d in report.differences} == {2}


def test_activation_shards_make_the_global_tensor():
    """The shapes say how an activation was split: SP + CP sequence shards (load-balanced
    chunks), a column-parallel output with fused gate/up rows, and sequence-first shards
    of what one process holds batch-first (the embedding's lookup under SP)."""
    full = torch.randn(16, 2, 12)
    tp, cp = 2, 2
    gate_up = torch.empty(0)  # shard_tensor reads only the layout of its `param`
    gate_up.param_layout = ParamLayout(dim=0, fused="gate_up")
    sequence, features = [], []
    for c in range(cp):
        local = split_for_context_parallel(full, cp, c, seq_dim=0)
        for t in range(tp):
            place = {"tp": (t, tp), "cp": (c, cp)}
            sequence.append((place, local.chunk(tp, dim=0)[t].numpy()))
            rows = shard_tensor(local.movedim(-1, 0), gate_up, tp, t)
            features.append((place, rows.movedim(0, -1).numpy()))
    [whole] = _activation(sequence, full.shape, tp, cp, None)
    np.testing.assert_array_equal(whole, full.numpy())
    [whole] = _activation(features, full.shape, tp, cp, gate_up.param_layout)
    np.testing.assert_array_equal(whole, full.numpy())
    [whole] = _activation(sequence, full.transpose(0, 1).shape, tp, cp, None)
    np.testing.assert_array_equal(whole, full.transpose(0, 1).numpy())


def test_expert_load_lines_say_whether_routing_parted():
    from paratron.debug.parity import expert_load_lines
    from paratron.debug.workers import RankRecords
    from paratron.training.moe_logging import ExpertLoad

    def records(counts):
        load = ExpertLoad(0, counts, counts, {"load_balancing_loss": 1.0})
        return RankRecords({}, {}, {}, {}, expert_load={1: [load]})

    reference = records([6.0, 2.0])
    assert expert_load_lines(reference, records([6.0, 2.0])) == [
        " iteration 1 | moe layer 0 | tokens per expert min: 2.0 max: 6.0 cv: 0.5000 |"
        " load_balancing_loss: 1.000000E+00 | routed alike"]
    assert expert_load_lines(reference, records([5.0, 3.0]))[0].endswith(
        "routed differently: 5, 3")
    assert expert_load_lines(reference, RankRecords({}, {}, {}, {}))[0].endswith(
        "routed differently: no count")
