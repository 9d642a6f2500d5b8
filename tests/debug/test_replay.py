"""`paratron replay`: iteration N rebuilt from a checkpoint saved before it gives the loss
the run logged (bit for bit at one process, within 1e-5 from a TP2xPP2 run), a NaN planted
in one weight is traced to its layer and op, MoE layers show their expert load, a
checkpoint imported from Megatron-LM replays with the data flags given, and bad input is
one line."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from paratron.checkpoint import files
from paratron.cli.args import parse_args
from paratron.cli.main import main
from paratron.config import resolve_vocab_size
from paratron.data.indexed_dataset import IndexedDatasetWriter
from paratron.debug.replay import ReplayError, load_replay, replay, report
from paratron.parallel.process_groups import ProcessGroups
from paratron.training.pretrain import build_datasets, build_tokenizer_for
from paratron.training.trainer import Trainer
from tests.helpers.dist_utils import run_distributed
from tests.helpers.shared_data import shared_file

FIXTURES = Path(__file__).parents[1] / "fixtures" / "megatron"
TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--max-position-embeddings 16 --device cpu --lr 1e-3 --lr-warmup-iters 1 "
        "--micro-batch-size 2 --global-batch-size 8 --train-iters 4 --save-interval 2 "
        "--eval-interval 1000 --eval-iters 0 --log-interval 1000 --num-workers 0").split()
MOE = ("--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 16 "
       "--moe-aux-loss-coeff 0.01 --swiglu --disable-bias-linear").split()
NAN_WEIGHT = "model/decoder.layers.1.mlp.linear_fc1.weight"


def _train(flags: list[str]) -> list[float]:
    """Train a run as `paratron train` would (on every rank of a layout) and return the
    losses it logged."""
    cfg = parse_args(flags)
    p = cfg.parallel
    pg = (ProcessGroups.build(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
          if cfg.world_size > 1 else None)
    tokenizer = build_tokenizer_for(cfg)
    cfg.model.padded_vocab_size = resolve_vocab_size(cfg, tokenizer.vocab_size)
    trainer = Trainer(cfg, build_datasets(cfg, tokenizer),
                      tokenizer_vocab_size=tokenizer.vocab_size, pg=pg, log=lambda line: None)
    return trainer.train().losses


def _write_corpus(prefix: Path, seed: int, vocab: int) -> None:
    rng = np.random.default_rng(seed)
    writer = IndexedDatasetWriter(f"{prefix}.bin", np.int32)
    for _ in range(200):
        writer.add_document(rng.integers(0, vocab - 1, int(rng.integers(4, 40))).tolist()
                            + [vocab - 1])
    writer.finalize(f"{prefix}.idx")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-process run on a blend of two corpora, saved at iterations 2 and 4."""
    root = tmp_path_factory.mktemp("replay")
    for name, seed in (("a", 1), ("b", 2)):
        _write_corpus(root / name, seed, 500)
    flags = TINY + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "499",
                    "--data-path", "0.7", str(root / "a"), "0.3", str(root / "b"),
                    "--split", "98,1,1", "--data-cache-path", str(root / "cache"),
                    "--save", str(root / "run")]
    return root, _train(flags)


def _replay(load_dir, iteration, overrides=None, **kwargs):
    trainer, _, tokenizer = load_replay(str(load_dir), iteration, overrides or {},
                                        log=lambda line: None)
    return replay(trainer, iteration, log=lambda line: None, **kwargs), tokenizer


def test_replay_gives_the_logged_loss_exactly(run):
    root, losses = run
    # From the checkpoint of iteration 2: iteration 3 at once, iteration 4 after one
    # ordinary step.
    for iteration in (3, 4):
        result, _ = _replay(root / "run", iteration)
        assert result.loaded_iteration == 2
        assert result.loss == losses[iteration - 1]
    probe = result.probe
    assert result.first_sample == 3 * 8 and len(probe.sample_losses) == 8
    assert probe.first_non_finite is None and not result.bad_parameters
    assert "decoder.layers.1.mlp.linear_fc1" in probe.activations
    assert "decoder.layers.1.mlp.linear_fc1" in probe.gradients
    assert "decoder.layers.1.mlp.linear_fc1.weight" in probe.weight_grads


def test_one_micro_batch_and_the_dump(run, tmp_path, capsys):
    root, _ = run
    assert main(["replay", "--load", str(root / "run"), "--iteration", "3", "--micro-batch",
                 "2", "--dump", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "lm loss" not in out  # one micro-batch: not the iteration's loss
    assert "worst sample" in out and " 20: " in out and " 21: " in out and " 22: " not in out
    dumped = tmp_path / "iteration_0000003.safetensors"
    with safe_open(str(dumped), framework="pt") as fh:
        keys = set(fh.keys())
        assert fh.metadata()["first_sample"] == "20"
        assert fh.get_tensor("sample_loss").shape == (2,)
    assert {"batch/tokens/2", "output/decoder.layers.0.mlp/2", "output_grad/decoder.layers.0/2",
            "weight_grad/decoder.layers.1.self_attention.linear_qkv.weight"} <= keys


def _plant_nan(checkpoint: Path, key: str) -> None:
    """Set one element of tensor `key` to NaN in the checkpoint, with the file's size and
    checksum in metadata.json updated so the checkpoint still verifies."""
    meta = json.loads((checkpoint / files.METADATA).read_text())
    chunk = meta["tensors"][key]["chunks"][0]
    path = checkpoint / chunk["file"]
    with safe_open(str(path), framework="pt") as fh:
        header = fh.metadata()
    tensors = load_file(str(path))
    tensors[chunk["key"]].view(-1)[5] = float("nan")
    save_file(tensors, str(path), metadata=header)
    meta["files"][chunk["file"]] = {"size": path.stat().st_size,
                                    "sha256": files.file_digest(path)}
    (checkpoint / files.METADATA).write_text(json.dumps(meta))


def test_a_nan_weight_is_traced_to_its_layer_and_op(run, tmp_path, capsys):
    root, _ = run
    broken = tmp_path / "run"
    shutil.copytree(root / "run", broken)
    _plant_nan(files.checkpoint_dir(broken, 2), NAN_WEIGHT)
    result, _ = _replay(broken, 3)
    first = result.probe.first_non_finite
    assert (first.direction, first.module, first.kind, first.micro_batch) == (
        "forward", "decoder.layers.1.mlp.linear_fc1", "NaN", 0)
    assert first.op in ("aten.addmm.default", "aten.mm.default")
    assert result.bad_parameters == ["decoder.layers.1.mlp.linear_fc1.weight"]
    assert result.probe.activations["decoder.layers.0.mlp.linear_fc1"].non_finite == 0
    assert result.probe.activations["decoder.layers.1.mlp.linear_fc1"].non_finite > 0
    assert main(["replay", "--load", str(broken), "--iteration", "3"]) == 0
    assert (f"first NaN/Inf: NaN first in the forward of decoder.layers.1.mlp.linear_fc1, "
            f"op {first.op}, micro-batch 0") in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [
    (["--iteration", "2"], "--iteration 2: no such iteration to replay"),
    (["--iteration", "5"], "--iteration 5: no such iteration: the run trains 4 iterations"),
    (["--iteration", "3", "--micro-batch", "4"], "--micro-batch 4: out of range"),
    (["--iteration", "0"], "--iteration 0: no such iteration"),
    (["--iteration", "3", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_input_is_one_line(run, capsys, flags, message):
    root, _ = run
    assert main(["replay", "--load", str(root / "run"), *flags]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("paratron replay: error:")


def test_missing_data_files_are_one_line(run, tmp_path, capsys):
    root, _ = run
    moved = tmp_path / "a.bin"
    shutil.move(root / "a.bin", moved)
    try:
        assert main(["replay", "--load", str(root / "run"), "--iteration", "3"]) != 0
    finally:
        shutil.move(moved, root / "a.bin")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a.bin" in err, err


def test_moe_layers_show_their_expert_load(tmp_path, capsys):
    flags = TINY + MOE + ["--mock-data", "--vocab-size", "63", "--save", str(tmp_path)]
    losses = _train(flags)
    result, _ = _replay(tmp_path, 3)
    assert result.loss == losses[2]
    tokens = 8 * 16 * 2  # samples x sequence x top-k
    assert [load.layer for load in result.expert_load] == [0, 1]
    assert all(sum(load.tokens_per_expert) == tokens for load in result.expert_load)
    lines = [line for line in report(result) if line.startswith(" moe layer")]
    assert len(lines) == 2 and "tokens per expert min" in lines[0]


def test_the_worst_sample_is_decoded_with_the_saved_tokenizer(tmp_path):
    vocab, merges = shared_file("gpt2/gpt2-vocab.json"), shared_file("gpt2/gpt2-merges.txt")
    _write_corpus(tmp_path / "corpus", 3, 50257)
    flags = TINY + ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab),
                    "--merge-file", str(merges), "--data-path", str(tmp_path / "corpus"),
                    "--split", "98,1,1", "--train-iters", "2", "--save-interval", "1",
                    "--data-cache-path", str(tmp_path / "cache"), "--save", str(tmp_path / "run")]
    _train(flags)
    result, tokenizer = _replay(tmp_path / "run", 2)
    assert tokenizer is not None
    losses = result.probe.sample_losses
    worst = losses.index(max(losses))
    text = tokenizer.decode(result.probe.samples[worst].tolist())
    assert f" worst sample as text: {text!r}" in report(result, tokenizer)


def test_a_checkpoint_imported_from_megatron_replays_with_data_flags(tmp_path, capsys):
    out = tmp_path / "imported"
    assert main(["convert", "--model-type", "GPT", "--loader", "megatron", "--saver",
                 "paratron", "--load-dir", str(FIXTURES / "gpt2" / "tp1" / "torch_dist"),
                 "--save-dir", str(out)]) == 0
    capsys.readouterr()
    assert main(["replay", "--load", str(out), "--iteration", "1"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "records no data settings" in err
    data = ["--mock-data", "--vocab-size", "255", "--train-iters", "2", "--lr", "1e-4",
            "--global-batch-size", "4", "--micro-batch-size", "2", "--eval-iters", "0"]
    with pytest.raises(ReplayError, match="records no data settings"):
        load_replay(str(out), 1, {}, log=lambda line: None)
    assert main(["replay", "--load", str(out), "--iteration", "1", *data]) == 0
    printed = capsys.readouterr().out
    assert "the data flags given here build the batches" in printed
    assert " iteration       1 | lm loss: " in printed


@pytest.mark.slow
def test_replay_of_a_tp2_pp2_run_matches_its_logged_loss(tmp_path):
    # Dropout masks depend on the layout's RNG streams: without dropout the layouts agree.
    flags = TINY + ["--mock-data", "--vocab-size", "63", "--save", str(tmp_path),
                    "--hidden-dropout", "0", "--attention-dropout", "0",
                    "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                    "--world-size", "4"]
    losses = run_distributed(4, _train, flags, timeout=240)[-1]
    for iteration in (3, 4):
        result, _ = _replay(tmp_path, iteration)
        assert result.loss == pytest.approx(losses[iteration - 1], rel=1e-5, abs=0)
    assert torch.isfinite(torch.tensor(result.probe.sample_losses)).all()
