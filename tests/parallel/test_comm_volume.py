"""Communication volume: what each rank sends in one training iteration, per layout.

Every collective of `torch.distributed` is wrapped on each rank (the parallel layers
look them up on the module at call time) and recorded as (op, group, bytes) during one
`train_step`; the multiset must equal the one worked out below by hand from the model
sizes — no hidden extra collectives, none missing.

Bytes are those of the whole tensor a collective covers: the tensor of an all-reduce,
the gathered output of an all-gather, the input of a reduce-scatter. With a ring
algorithm over n ranks each rank then sends 2(n-1)/n of that for an all-reduce and
(n-1)/n for an all-gather or a reduce-scatter, so one all-reduce costs exactly one
reduce-scatter plus one all-gather of the same tensor (what sequence parallelism relies on).

The model: 2 layers, hidden 32, 4 heads, LayerNorm, biases, GELU MLP (ffn 4h; 127 in the
DP-only layouts so that buckets need padding), RoPE (no position table, so under
sequence parallelism the embedding reduce-scatters directly; one layout has a table),
embedding tied to the output layer, padded vocabulary 128, sequence 16, micro-batch 2,
one micro-batch per step, fp32 (one layout bf16), no dropout.
"""

import functools
import inspect

import pytest
import torch.distributed as dist

from tests.helpers.dist_utils import run_distributed
from paratron.cli.args import parse_args
from paratron.parallel.process_groups import ProcessGroups
from paratron.training.trainer import Trainer
from tests.helpers.training import PatternData

LAYERS, HIDDEN, HEADS, SEQ, MICRO, VOCAB = 2, 32, 4, 16, 2, 128
FP32, BF16, FP64 = 4, 2, 8
BUCKET = 10_000  # --ddp-bucket-size of the data-parallel layouts: several buckets

COMMON = (f"--num-layers {LAYERS} --hidden-size {HIDDEN} --num-attention-heads {HEADS} "
          f"--seq-length {SEQ} --max-position-embeddings {SEQ} --position-embedding-type rope "
          f"--padded-vocab-size {VOCAB} --micro-batch-size {MICRO} --lr 1e-3 --device cpu "
          "--train-iters 2 --eval-interval 1000 --eval-iters 0 --log-interval 1000 "
          "--hidden-dropout 0 --attention-dropout 0 --num-workers 0").split()

# name: (tp, dp, ffn hidden size, extra flags). An odd ffn size (127) makes some
# buckets odd-sized, so at DP 2 they are padded; TP needs an even one.
LAYOUTS = {
    "tp2": (2, 1, 128, []),
    "tp2_sp": (2, 1, 128, ["--sequence-parallel"]),
    "tp2_sp_learned_positions": (2, 1, 128, ["--sequence-parallel",
                                             "--position-embedding-type", "learned_absolute"]),
    "dp2": (1, 2, 127, ["--ddp-bucket-size", str(BUCKET)]),
    "dp2_overlap": (1, 2, 127, ["--ddp-bucket-size", str(BUCKET), "--overlap-grad-reduce"]),
    "dp2_distopt": (1, 2, 127, ["--ddp-bucket-size", str(BUCKET),
                                "--use-distributed-optimizer"]),
    "dp2_distopt_bf16_overlap": (1, 2, 127, ["--ddp-bucket-size", str(BUCKET),
                                             "--use-distributed-optimizer", "--bf16",
                                             "--overlap-grad-reduce",
                                             "--overlap-param-gather"]),
    "tp2_dp2_sp_distopt": (2, 2, 128, ["--ddp-bucket-size", str(BUCKET), "--sequence-parallel",
                                       "--use-distributed-optimizer"]),
}

# Every collective torch.distributed offers that moves tensor data; the ones the trainer
# is expected to use get a canonical name, any other shows up under its own name.
CANONICAL = {"all_reduce": "all_reduce",
             "all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather",
             "all_gather": "all_gather",
             "reduce_scatter_single": "reduce_scatter",
             "reduce_scatter_tensor": "reduce_scatter"}
OTHERS = ["broadcast", "reduce", "reduce_scatter", "all_to_all", "all_to_all_single",
          "send", "recv", "isend", "irecv", "batch_isend_irecv", "barrier", "gather",
          "scatter", "all_gather_object", "broadcast_object_list", "all_gather_coalesced",
          "all_reduce_coalesced", "monitored_barrier"]


def _nbytes(op, bound):
    a = bound.arguments
    if op == "all_reduce":
        return a["tensor"].nbytes
    if op in ("all_gather_single", "all_gather_into_tensor"):
        return a["output_tensor"].nbytes
    if op == "all_gather":
        return sum(t.nbytes for t in a["tensor_list"])
    if op == "reduce_scatter_single":
        return a["input"].nbytes
    if op == "reduce_scatter_tensor":
        return a["input"].nbytes
    return -1  # not expected at all: the name alone fails the comparison


class CommRecorder:
    """Wraps torch.distributed's collectives; records (op, group, bytes) of the
    outermost call (a wrapper that calls another is counted once)."""

    def __init__(self, group_names):
        self.group_names = group_names  # tuple of global ranks -> "tp" / "dp"
        self.records = None
        self._depth = 0
        self._saved = {}

    def _group(self, group):
        if group is None:
            group = dist.group.WORLD
        ranks = tuple(dist.get_process_group_ranks(group))
        return self.group_names.get(ranks, ranks)

    def _wrap(self, name, original):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            outermost = self._depth == 0
            if outermost and self.records is not None:
                bound = signature.bind(*args, **kwargs)
                group = self._group(bound.arguments.get("group"))
                self.records.append((CANONICAL.get(name, name), group,
                                     _nbytes(name, bound)))
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1
        return wrapper

    def __enter__(self):
        for name in list(CANONICAL) + OTHERS:
            original = getattr(dist, name, None)
            if original is not None:
                self._saved[name] = original
                setattr(dist, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


def _rank_measure(flags, tp):
    pg = ProcessGroups.build(tp, 1)
    cfg = parse_args(flags + ["--world-size", str(dist.get_world_size())])
    trainer = Trainer(cfg, (PatternData(SEQ, 120), None, None), pg=pg, log=lambda line: None)
    names = {}
    if pg.tp.size > 1:
        names[tuple(dist.get_process_group_ranks(pg.tp.group))] = "tp"
    if pg.dp.size > 1:
        names[tuple(dist.get_process_group_ranks(pg.dp.group))] = "dp"
    steps = []
    with CommRecorder(names) as recorder:
        for _ in range(2):  # the second step too: nothing is a first-step special case
            recorder.records = []
            trainer.train_step()
            steps.append(recorder.records)
            recorder.records = None
    trainer.model.finish_param_gather()
    return steps, [p.numel() for p in trainer.model.module.parameters()]


@functools.lru_cache(maxsize=None)
def _measure(layout):
    tp, dp, ffn, extra = LAYOUTS[layout]
    flags = COMMON + ["--tensor-model-parallel-size", str(tp), "--ffn-hidden-size", str(ffn),
                      "--global-batch-size", str(MICRO * dp)] + extra
    return run_distributed(tp * dp, _rank_measure, flags, tp, timeout=120)


# ---------------------------------------------------------------- expected, by hand

def _local_param_sizes(ffn, tp, learned_positions=False):
    """This rank's parameter sizes in the model's order (word embeddings, position table,
    per layer: input norm, qkv, proj, pre-MLP norm, fc1, fc2; final norm; the output
    layer is tied)."""
    h = HIDDEN
    layer = [h, h,                                 # input_layernorm weight, bias
             3 * h // tp * h, 3 * h // tp,             # linear_qkv (column): weight, bias
             h * (h // tp), h,                         # linear_proj (row): weight, bias
             h, h,                                     # pre_mlp_layernorm weight, bias
             ffn // tp * h, ffn // tp,                 # linear_fc1 (column)
             h * (ffn // tp), h]                       # linear_fc2 (row)
    positions = [SEQ * h] if learned_positions else []
    return [VOCAB // tp * h] + positions + layer * LAYERS + [h, h]


def _buckets(sizes, dp, bucket_size=BUCKET):
    """Bucket sizes in elements: parameters in reverse order, a bucket closes once it
    holds at least `bucket_size` elements, each padded to a multiple of DP."""
    out, current = [], 0
    for n in reversed(sizes):
        current += n
        if current >= bucket_size:
            out.append(current)
            current = 0
    if current:
        out.append(current)
    return [-(-n // dp) * dp for n in out]


def _learned(extra):
    return "learned_absolute" in extra


def _tp_expected(sp, learned_positions=False):
    """Collectives over the TP group for one micro-batch (group "tp").

    With a learned position table under sequence parallelism the embedding all-reduces
    the word embeddings, adds the positions and keeps this rank's sequence shard (as
    Megatron-LM does); backward all-gathers the shards' gradient. Without a position
    table (RoPE) the lookups are reduce-scattered straight to sequence shards.
    """
    act = SEQ * MICRO * HIDDEN * FP32          # one activation [s, b, h]
    per_token = MICRO * SEQ * FP32             # one number per token
    if not sp:
        forward = ([("all_reduce", "tp", act)]          # embedding: partial lookups
                   + [("all_reduce", "tp", act)] * 2 * LAYERS)  # linear_proj, linear_fc2
        # output layer: identity forward
        backward = ([("all_reduce", "tp", act)]         # output layer input gradient
                    + [("all_reduce", "tp", act)] * 2 * LAYERS)  # linear_fc1, linear_qkv
        # embedding, linear_fc2, linear_proj: identity backward
        extra = []
    else:
        embedding_fwd, embedding_bwd = ("reduce_scatter", "tp", act), ("all_gather", "tp", act)
        if learned_positions:
            embedding_fwd = ("all_reduce", "tp", act)  # then split: no communication
        forward = ([embedding_fwd]
                   + [("all_gather", "tp", act),          # before linear_qkv
                      ("reduce_scatter", "tp", act),      # after linear_proj
                      ("all_gather", "tp", act),          # before linear_fc1
                      ("reduce_scatter", "tp", act)] * LAYERS  # after linear_fc2
                   + [("all_gather", "tp", act)])         # before the output layer
        backward = ([("reduce_scatter", "tp", act)]      # output layer
                    + [("all_gather", "tp", act),         # linear_fc2
                       ("reduce_scatter", "tp", act),     # linear_fc1
                       ("all_gather", "tp", act),         # linear_proj
                       ("reduce_scatter", "tp", act)] * LAYERS  # linear_qkv
                    + [embedding_bwd])
        # Replicated weights applied to sequence shards, summed over TP in one
        # all-reduce: both LayerNorms (weight + bias) and the row-parallel biases of
        # linear_proj and linear_fc2 per layer, and the final LayerNorm.
        sp_params = LAYERS * (2 * 2 * HIDDEN + 2 * HIDDEN) + 2 * HIDDEN
        extra = [("all_reduce", "tp", sp_params * FP32)]
    cross_entropy = [("all_reduce", "tp", per_token)] * 3  # max, target logit, sum of exps
    grad_norm = [("all_reduce", "tp", 2 * FP64)]  # squared norm and zero count, float64
    return forward + cross_entropy + backward + extra + grad_norm


def _dp_expected(tp, dp, ffn, distopt, param_bytes):
    """Collectives over the DP group for one step (group "dp")."""
    buckets = _buckets(_local_param_sizes(ffn, tp), dp)
    out = [("all_reduce", "dp", FP64),   # trainer: loss tokens of the global batch
           ("all_reduce", "dp", 2 * FP64)]  # trainer: loss sum and tokens, for the log
    if not distopt:
        out += [("all_reduce", "dp", n * FP32) for n in buckets]  # fp32 gradient buckets
    else:
        out += [("reduce_scatter", "dp", n * FP32) for n in buckets]     # gradients
        out += [("all_gather", "dp", n * param_bytes) for n in buckets]  # updated weights
        out += [("all_reduce", "dp", 2 * FP64)]  # grad norm and zero count of the shards
    return out


def _expected(layout):
    tp, dp, ffn, extra = LAYOUTS[layout]
    out = []
    if tp > 1:
        out += _tp_expected("--sequence-parallel" in extra, _learned(extra))
    if dp > 1:
        out += _dp_expected(tp, dp, ffn, "--use-distributed-optimizer" in extra,
                            BF16 if "--bf16" in extra else FP32)
    return out


def _sent(records):
    """Bytes one rank sends with ring algorithms over groups of 2."""
    n = 2
    factor = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n,
              "reduce_scatter": (n - 1) / n}
    return sum(factor[op] * nbytes for op, _, nbytes in records)


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_one_iteration_sends_exactly_the_expected_collectives(layout):
    tp, _, ffn, extra = LAYOUTS[layout]
    expected = sorted(_expected(layout), key=repr)
    for rank, (steps, sizes) in enumerate(_measure(layout)):
        assert sizes == _local_param_sizes(ffn, tp, _learned(extra)), "hand-listed sizes"
        for step, records in enumerate(steps):
            assert sorted(records, key=repr) == expected, (
                f"{layout} rank {rank} step {step + 1}: got {sorted(records, key=repr)}")


def test_bucket_padding_is_exercised():
    """The DP layouts above really pad: 29,438 parameters in buckets of >= 10,000
    elements (reverse order) are 12,639 + 12,639 + 4,160, padded to even sizes at DP 2."""
    sizes = _local_param_sizes(127, 1)
    assert sum(sizes) == 29_438
    assert _buckets(sizes, 2) == [12_640, 12_640, 4_160]


def test_sequence_parallel_moves_the_same_activation_bytes_as_all_reduce():
    """TP2+SP sends what TP2 sends for the activations; the only extra is the one
    all-reduce of the sequence-parallel norm and bias gradients."""
    act = SEQ * MICRO * HIDDEN * FP32
    tp = [r for r in _measure("tp2")[0][0][0] if r[2] == act]
    sp = [r for r in _measure("tp2_sp")[0][0][0] if r[2] == act]
    assert {op for op, _, _ in tp} == {"all_reduce"}
    assert {op for op, _, _ in sp} == {"all_gather", "reduce_scatter"}
    assert len(sp) == 2 * len(tp)
    assert _sent(sp) == _sent(tp) == 2 * (1 + 2 * LAYERS) * act
    rest_tp = [r for r in _measure("tp2")[0][0][0] if r[2] != act]
    rest_sp = [r for r in _measure("tp2_sp")[0][0][0] if r[2] != act]
    assert len(rest_sp) == len(rest_tp) + 1


def test_distributed_optimizer_splits_the_gradient_all_reduce():
    """fp32 weights: reduce-scatter + all-gather send what the plain all-reduce sends."""
    def big(records):
        return [r for r in records if r[2] > 2 * FP64]
    plain = big(_measure("dp2")[0][0][0])
    sharded = big(_measure("dp2_distopt")[0][0][0])
    assert _sent(plain) == _sent(sharded) > 0
