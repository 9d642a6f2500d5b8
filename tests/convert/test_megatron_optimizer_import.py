"""A Megatron-Core run with the distributed optimizer continues in Paratron.

The fixture (tests/fixtures/megatron/optimizer, written by Megatron-Core 0.16.1 itself) is
a tiny Llama trained 3 steps at TP2 x DP2. `paratron convert --loader megatron` carries its
main weights, Adam moments, step count and progress; a one-process Paratron run (another
layout) loads them, and they equal Megatron's own tensors (record.npz) exactly. Its next
step is then checked against AdamW applied by hand, in float64, to those tensors with
Megatron's own step-4 gradient, and against Megatron's step-4 weights. A second fixture
(optimizer_layouts: GPT-2 with tied embeddings at TP2 x PP2 x DP2, six gradient buckets on
the first stage, the embedding in its own) imports exactly too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from paratron.checkpoint.checkpointing import TensorReader
from paratron.checkpoint.safe_pickle import load_torch
from paratron.checkpoint.state import collect_chunks
from paratron.cli.args import parse_args
from paratron.cli.convert import main as convert
from paratron.parallel.process_groups import ProcessGroups
from paratron.training.trainer import Trainer
from tests.helpers.dist_utils import run_distributed

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "megatron" / "optimizer"
LAYOUTS = ROOT.parent / "optimizer_layouts"
RECORD = json.loads((ROOT / "RECORD.json").read_text())
FORMATS = ("torch_dist", "torch")


def collect_tensors(models, pg, optimizer) -> dict[str, torch.Tensor]:
    """The logical tensors the ranks write, each put together whole from its chunks."""
    chunks = [(c.name, c.shape, c.offsets, c.tensor)
              for c in collect_chunks(models, pg, optimizer)]
    if torch.distributed.is_initialized():
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, chunks)
        chunks = [chunk for part in everyone for chunk in part]
    out = {}
    for name, shape, offsets, t in chunks:
        full = out.setdefault(name, t.new_empty(shape))
        full[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))] = t
    return out


@pytest.fixture(scope="module")
def record():
    with np.load(ROOT / "record.npz", allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def logical(name: str, array: np.ndarray) -> torch.Tensor:
    """A record.npz tensor (TP shards concatenated) in Paratron's layout: a SwiGLU fc1 is
    [gate; up] of the whole layer, not each rank's [gate_r; up_r] one after another."""
    t = torch.from_numpy(array)
    if name.endswith("linear_fc1.weight"):
        halves = [shard.chunk(2) for shard in t.chunk(RECORD["tp"])]
        t = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return t


class Rows:
    """Megatron's data: sample i is row i % 2 of the fixture tokens, shifted by one."""

    def __init__(self):
        self.tokens = np.array(RECORD["tokens"])

    def __len__(self):
        return 1000

    def __getitem__(self, i):
        row = self.tokens[i % len(self.tokens)]
        return {"tokens": row[:-1], "labels": row[1:],
                "loss_mask": np.ones(len(row) - 1, np.float32),
                "position_ids": np.arange(len(row) - 1)}


def run_flags(load: Path) -> list[str]:
    """The Megatron run's flags, for Paratron (the model comes from the checkpoint)."""
    h = RECORD["hyper_parameters"]
    return (f"--load {load} --use-checkpoint-args --seq-length {len(RECORD['tokens'][0]) - 1} "
            f"--micro-batch-size {RECORD['micro_batch_size']} "
            f"--global-batch-size {RECORD['global_batch_size']} --lr {h['lr']} "
            f"--min-lr {h['min_lr']} --lr-decay-style {h['lr_decay_style']} "
            f"--lr-warmup-iters {h['lr_warmup_iters']} --train-iters {h['train_iters']} "
            f"--weight-decay {h['weight_decay']} --adam-beta1 {h['adam_beta1']} "
            f"--adam-beta2 {h['adam_beta2']} --adam-eps {h['adam_eps']} "
            f"--clip-grad {h['clip_grad']} --device cpu --eval-iters 0 "
            f"--log-interval 1000 --num-workers 0").split()


@pytest.fixture(scope="module", params=FORMATS)
def converted(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "paratron"
    assert convert(["--model-type", "GPT", "--loader", "megatron", "--saver", "paratron",
                    "--load-dir", str(ROOT / request.param), "--save-dir", str(out)]) == 0
    return out


def trainer_from(converted: Path, *layout: str, pg=None) -> Trainer:
    data = Rows()
    return Trainer(parse_args(run_flags(converted) + list(layout)), (data, data, None),
                   log=lambda line: None, pg=pg)


def test_conversion_carries_progress(converted):
    meta = json.loads((converted / f"iter_{RECORD['steps']:07d}" / "metadata.json").read_text())
    assert meta["iteration"] == RECORD["steps"]
    assert meta["train_state"]["consumed_train_samples"] == \
        RECORD["steps"] * RECORD["global_batch_size"]
    assert meta["optimizer"]["step_count"] == RECORD["steps"]
    assert meta["config"]["optimizer"]["adam_beta2"] == RECORD["hyper_parameters"]["adam_beta2"]


def test_loaded_state_is_megatrons(converted, record):
    trainer = trainer_from(converted)
    assert trainer.state.iteration == RECORD["steps"]
    loaded = collect_tensors(trainer.models, trainer.pg, trainer.optimizer)
    names = [key.split("/", 1)[1] for key in record if key.startswith("main/")]
    assert len(names) == len([k for k in loaded if k.startswith("model/")])
    for name in names:
        assert torch.equal(loaded[f"model/{name}"], logical(name, record[f"main/{name}"])), name
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(loaded[f"optim/{moment}/{name}"],
                               logical(name, record[f"{moment}/{name}"])), (moment, name)


def expected_step4(record, before: dict) -> dict[str, torch.Tensor]:
    """AdamW by hand (float64) on the state `before` with Megatron's step-4 gradient,
    clipped to the global norm as Megatron clips it."""
    h = RECORD["hyper_parameters"]
    names = [key.split("/", 1)[1] for key in record if key.startswith("main/")]
    grads = {n: logical(n, record[f"grad_step4/{n}"]).double() for n in names}
    norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
    clip = min(1.0, h["clip_grad"] / (float(norm) + 1e-6))
    lr, step = float(record["lr_step4"]), RECORD["steps"] + 1
    beta1, beta2 = h["adam_beta1"], h["adam_beta2"]
    out = {}
    for name in names:
        grad = grads[name] * clip
        exp_avg = beta1 * before[f"optim/exp_avg/{name}"].double() + (1 - beta1) * grad
        exp_avg_sq = beta2 * before[f"optim/exp_avg_sq/{name}"].double() + \
            (1 - beta2) * grad * grad
        weight = before[f"model/{name}"].double()
        decay = h["weight_decay"] if weight.dim() > 1 else 0.0
        denom = (exp_avg_sq / (1 - beta2 ** step)).sqrt() + h["adam_eps"]
        out[name] = weight * (1 - lr * decay) - lr * exp_avg / (1 - beta1 ** step) / denom
    return out


def test_next_step_is_adamw_by_hand(converted, record):
    """Step 4 in Paratron = AdamW by hand on the loaded tensors = Megatron's step 4."""
    trainer = trainer_from(converted)
    before = {k: t.clone() for k, t in
              collect_tensors(trainer.models, trainer.pg, trainer.optimizer).items()}
    loss, stepped, _, _ = trainer.train_step()
    assert stepped
    after = collect_tensors(trainer.models, trainer.pg, trainer.optimizer)
    for name, expected in expected_step4(record, before).items():
        got = after[f"model/{name}"].double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(got, logical(name, record[f"main_step4/{name}"]).double(),
                                   rtol=1e-5, atol=1e-7, msg=name)
    assert abs(loss - float(record["loss_step4"])) < 1e-5


def _step_at(converted: Path, tp: int, pp: int) -> tuple[dict, dict]:
    """One rank of a run at another layout: the logical tensors it writes (a share of the
    whole), as loaded and after step 4."""
    pg = ProcessGroups.build(tp, pp)
    trainer = trainer_from(converted, "--tensor-model-parallel-size", str(tp),
                           "--pipeline-model-parallel-size", str(pp),
                           "--use-distributed-optimizer", "--world-size",
                           str(pg.world_size), pg=pg)
    before = {k: t.clone() for k, t in
              collect_tensors(trainer.models, trainer.pg, trainer.optimizer).items()}
    trainer.train_step()
    after = collect_tensors(trainer.models, trainer.pg, trainer.optimizer)
    return before, after


@pytest.mark.slow
def test_continues_at_another_layout(converted, record):
    """PP2 x DP2 with the distributed optimizer (Megatron ran TP2 x DP2): every rank loads
    its shard of Megatron's state, and step 4 is AdamW by hand on it."""
    pieces = run_distributed(4, _step_at, converted, 1, 2, timeout=240)
    before = {k: t for b, _ in pieces for k, t in b.items()}
    after = {k: t for _, a in pieces for k, t in a.items()}
    names = [key.split("/", 1)[1] for key in record if key.startswith("main/")]
    for name in names:
        assert torch.equal(before[f"model/{name}"], logical(name, record[f"main/{name}"]))
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(before[f"optim/{moment}/{name}"],
                               logical(name, record[f"{moment}/{name}"])), (moment, name)
    for name, expected in expected_step4(record, before).items():
        torch.testing.assert_close(after[f"model/{name}"].double(), expected, rtol=1e-5,
                                   atol=1e-7, msg=name)


@pytest.mark.parametrize("folder", FORMATS)
def test_pipeline_stages_and_buckets_import_exactly(folder, tmp_path):
    out = tmp_path / "paratron"
    assert convert(["--model-type", "GPT", "--loader", "megatron", "--saver", "paratron",
                    "--load-dir", str(LAYOUTS / folder), "--save-dir", str(out)]) == 0
    meta = json.loads((out / "iter_0000003" / "metadata.json").read_text())
    with np.load(LAYOUTS / "record.npz", allow_pickle=False) as data:
        record = {name: data[name] for name in data.files}
    keys = {"main": "model", "exp_avg": "optim/exp_avg", "exp_avg_sq": "optim/exp_avg_sq"}
    wanted = {f"{keys[k.split('/', 1)[0]]}/{k.split('/', 1)[1]}": k for k in record}
    assert set(wanted) == {k for k in meta["tensors"] if not k.startswith("buffer/")}
    read = TensorReader(out / "iter_0000003", meta)
    for key, name in wanted.items():
        assert torch.equal(read(key), torch.from_numpy(record[name])), key


def test_bf16_target_keeps_fp32_main_weights(record, tmp_path):
    """Converted to bf16 weights, the fp32 main weights travel as `optim/main/`, as a bf16
    Paratron run saves them."""
    out = tmp_path / "bf16"
    assert convert(["--model-type", "GPT", "--loader", "megatron", "--saver", "paratron",
                    "--load-dir", str(ROOT / "torch_dist"), "--save-dir", str(out),
                    "--bf16"]) == 0
    meta = json.loads((out / "iter_0000003" / "metadata.json").read_text())
    read = TensorReader(out / "iter_0000003", meta)
    for key in (k for k in record if k.startswith("main/")):
        name = key.split("/", 1)[1]
        main = logical(name, record[key])
        assert torch.equal(read(f"optim/main/{name}"), main)
        assert torch.equal(read(f"model/{name}"), main.bfloat16())


def test_state_that_cannot_travel_is_named(tmp_path, capsys):
    """An optimizer Paratron does not carry (here the args say SGD) leaves a one-line note;
    the weights convert, without optimizer state."""
    src = tmp_path / "megatron"
    shutil.copytree(ROOT / "torch", src)
    path = src / f"iter_{RECORD['steps']:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    state = load_torch(path, mmap=False)  # the file is rewritten below
    state["args"].optimizer = "sgd"
    state["args"].attention_backend = None  # an inert stand-in once read; not re-pickled
    torch.save(state, path)
    out = tmp_path / "out"
    assert convert(["--model-type", "GPT", "--loader", "megatron", "--saver", "paratron",
                    "--load-dir", str(src), "--save-dir", str(out)]) == 0
    err = capsys.readouterr().err.strip()
    assert "optimizer state is not converted: the optimizer is sgd" in err
    assert "--finetune" in err and len(err.splitlines()) == 1
    assert json.loads((out / "iter_0000000" / "metadata.json").read_text())["optimizer"] is None


def test_weights_only_conversion(tmp_path):
    """--no-load-optim converts the weights of a checkpoint that holds optimizer state
    (which the importer once refused as tensors foreign to the model)."""
    out = tmp_path / "weights"
    assert convert(["--model-type", "GPT", "--loader", "megatron", "--saver", "paratron",
                    "--load-dir", str(ROOT / "torch_dist"), "--save-dir", str(out),
                    "--no-load-optim"]) == 0
    meta = json.loads((out / "iter_0000000" / "metadata.json").read_text())
    assert meta["optimizer"] is None
    assert not [k for k in meta["tensors"] if k.startswith("optim/")]


def test_a_damaged_buffer_is_refused(tmp_path, capsys):
    """A bucket whose main weights are not the model's stops the conversion in one line,
    with nothing written."""
    src = tmp_path / "megatron"
    shutil.copytree(ROOT / "torch", src)
    path = src / f"iter_{RECORD['steps']:07d}" / "mp_rank_01" / "distrib_optim.pt"
    state = torch.load(path, weights_only=True)
    (flat,) = state[0].values()
    flat["param"][100] += 1.0
    torch.save(state, path)
    out = tmp_path / "out"
    code = convert(["--model-type", "GPT", "--loader", "megatron", "--saver", "paratron",
                    "--load-dir", str(src), "--save-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert "are not the model's" in err and "--no-load-optim" in err
    assert not out.exists()
