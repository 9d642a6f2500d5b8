"""Metrics: Megatron's timer and memory lines, the MFU table, TensorBoard scalars read back
from the event files, the JSON-lines file and the performance summary of a real run,
and the preprocess progress bar."""

import io
import json
import math

import pytest
import torch

from paratron.cli.args import parse_args
from paratron.options import ConfigError
from paratron.data.preprocess import preprocess_data
from paratron.training.faults import LossSpikeDetector, straggler_line
from paratron.training.hardware import lookup_peak_tflops, memory_line, mfu
from paratron.training.pretrain import pretrain
from paratron.training.timers import Timers, format_min_max, min_max

TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--max-position-embeddings 16 --lr 1e-3 --train-iters 6 --micro-batch-size 2 "
        "--global-batch-size 4 --mock-data --vocab-size 99 --device cpu --num-workers 0 "
        "--log-interval 3 --eval-interval 3 --eval-iters 1").split()
MOE = ("--num-experts 2 --moe-router-topk 1 --moe-ffn-hidden-size 48 --moe-aux-loss-coeff 0.01 "
       "--disable-bias-linear --moe-router-pre-softmax").split()


# ---------------------------------------------------------------- formats and tables
def test_timer_block_matches_megatron_console_log():
    # Lines copied from a Megatron-LM run's console output (GPT-2, one GPU).
    assert format_min_max(["evaluate"], [(3274.73, 3274.73)]) == (
        "(min, max) time across ranks (ms):\n"
        "    evaluate .......................................: (3274.73, 3274.73)")
    assert format_min_max(["evaluate"], [None]) is None
    # A rank that never ran a timer (-1) does not count in its min and max.
    table = torch.tensor([[5.0, -1.0], [7.0, 3.0], [6.0, -1.0]])
    assert min_max(table) == [(5.0, 7.0), (3.0, 3.0)]


def test_timer_levels_pick_what_is_reported():
    timers = Timers(1, torch.device("cpu"))
    with timers("forward-backward"):
        pass
    with timers("batch-generator"):  # level 2: measured, not reported at level 1
        pass
    assert timers.reported() == ["forward-backward", "embedding-grads-all-reduce",
                                 "all-grads-sync", "optimizer", "evaluate"]
    ms = timers.pop_ms(["forward-backward", "optimizer"], normalizer=2)
    assert ms[0] >= 0 and ms[1] == -1.0  # optimizer never started
    with pytest.raises(KeyError):
        timers("no-such-timer")


def test_memory_line_matches_megatron_console_log():
    stats = {"allocated": 1464.33154296875, "max allocated": 1464.3408203125,
             "reserved": 1576.0, "max reserved": 1576.0}
    assert memory_line(0, 10, stats, torch.device("cuda")) == (
        "[Rank 0] (after 10 iterations) memory (MB) | allocated: 1464.33154296875 | "
        "max allocated: 1464.3408203125 | reserved: 1576.0 | max reserved: 1576.0")
    cpu = memory_line(1, 5, {"rss": 10.0, "max rss": 12.0}, torch.device("cpu"))
    assert cpu.startswith("[Rank 1] (after 5 iterations) memory (MB) | rss: 10.0 | max rss: 12.0")
    assert "CPU" in cpu


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "half", 989.0), ("NVIDIA H100 PCIe", "half", 756.0),
    ("NVIDIA H200", "half", 989.0), ("NVIDIA A100-SXM4-80GB", "half", 312.0),
    ("NVIDIA A800-SXM4-80GB", "half", 312.0), ("NVIDIA H800", "half", 989.0),
    ("NVIDIA L40S", "half", 362.0), ("NVIDIA GeForce RTX 4090", "half", 165.0),
    ("NVIDIA A100-SXM4-80GB", "tf32", 156.0), ("NVIDIA A100-SXM4-80GB", "fp32", 19.5),
    ("NVIDIA L4", "half", 121.0), ("NVIDIA A10G", "half", None), ("cpu", "fp32", None)])
def test_peak_table(name, precision, peak):
    assert lookup_peak_tflops(name, precision) == peak


def test_mfu_arithmetic_by_hand():
    # 6.0e15 FLOPs per iteration in 2 s on 4 GPUs: 750 TFLOP/s per GPU; an H100's 989.
    tflops = 6.0e15 / (2.0 * 4 * 1e12)
    assert tflops == 750.0
    assert mfu(tflops, lookup_peak_tflops("NVIDIA H100 80GB HBM3", "half")) == \
        pytest.approx(0.758342, abs=1e-6)
    assert mfu(tflops, None) is None


def test_loss_spike_warning_on_a_synthetic_spike():
    detector = LossSpikeDetector(3.0, window=100, min_history=10)
    losses = [2.0 + 0.01 * (i % 3) for i in range(30)] + [7.5, 2.0]
    warnings = [detector.check(i + 1, x) for i, x in enumerate(losses)]
    hits = [(i + 1, w) for i, w in enumerate(warnings) if w]
    assert len(hits) == 1 and hits[0][0] == 31
    assert "loss spike at iteration 31" in hits[0][1] and "\n" not in hits[0][1]
    assert LossSpikeDetector(0.0).check(1, 1e9) is None  # turned off
    # Too little history: no verdict yet.
    young = LossSpikeDetector(3.0)
    assert all(young.check(i, x) is None for i, x in enumerate([1.0, 1.0, 50.0]))


def test_straggler_line_names_the_slowest_rank():
    line = straggler_line([10.0, 30.0, 11.0], threshold=0.2, always=False)
    assert "straggler" in line and "max: 30.0 (rank 1)" in line and "min: 10.0 (rank 0)" in line
    assert straggler_line([10.0, 10.5], threshold=0.2, always=False) is None
    assert "rank balance" in straggler_line([10.0, 10.5], threshold=0.2, always=True)


# ---------------------------------------------------------------- a real run
def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def _hand_flops(h, layers, s, vocab, ffn, topk, gbs):
    """Megatron's count for this model by hand: causal MHA, a top-1 MoE MLP, logits."""
    attention = 12 * layers * h * h * (1 + 1 + s / h / 2)
    mlp = 12 * layers * h * ffn * topk
    logits = 6 * h * vocab
    return gbs * s * (attention + mlp + logits)


def test_tensorboard_jsonl_and_summary_of_a_run(tmp_path):
    tb, jsonl, summary = tmp_path / "tb", tmp_path / "m.jsonl", tmp_path / "perf.json"
    lines = []
    state = pretrain(parse_args(TINY + MOE + [
        "--tensorboard-dir", str(tb), "--log-timers-to-tensorboard", "--timing-log-level", "1",
        "--log-validation-ppl-to-tensorboard", "--log-memory-to-tensorboard",
        "--log-throughput", "--peak-tflops", "0.5", "--log-params-norm",
        "--log-num-zeros-in-grad",
        "--metrics-jsonl", str(jsonl), "--performance-summary", str(summary)]),
        log=lines.append)
    scalars = _scalars(tb)
    for tag in ["lm loss", "lm loss vs samples", "learning-rate", "batch-size", "loss-scale",
                "grad-norm", "num-zeros", "load_balancing_loss", "throughput",
                "tokens-per-sec-per-gpu", "mfu", "params-norm", "iteration-time",
                "forward-backward-time", "optimizer-time", "all-grads-sync-time",
                "mem-max-rss-bytes", "lm loss validation", "lm loss validation ppl"]:
        assert tag in scalars, (tag, sorted(scalars))
    assert [step for step, _ in scalars["lm loss"]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in scalars["lm loss"]] == pytest.approx(state.losses, rel=1e-6)
    assert [step for step, _ in scalars["lm loss vs samples"]] == [4, 8, 12, 16, 20, 24]
    assert [step for step, _ in scalars["lm loss validation"]] == [3, 6]
    assert [step for step, _ in scalars["num-zeros"]] == [3, 6]  # counted when logged
    (_, val), (_, ppl) = scalars["lm loss validation"][0], scalars["lm loss validation ppl"][0]
    assert ppl == pytest.approx(math.exp(val), rel=1e-5)

    records = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert [(r["kind"], r["iteration"]) for r in records] == [
        ("train", 3), ("validation", 3), ("train", 6), ("validation", 6), ("test", 6)]
    first = records[0]
    assert first["lm_loss"] == pytest.approx(sum(state.losses[:3]) / 3, rel=1e-9)
    flops = _hand_flops(32, 2, 16, 128, 48, 1, 4)  # vocab 99 padded to 128
    seconds = first["elapsed_ms_per_iteration"] / 1000.0
    assert first["tflops_per_gpu"] * seconds * 1e12 == pytest.approx(flops, rel=1e-9)
    assert first["mfu"] == pytest.approx(first["tflops_per_gpu"] / 0.5, rel=1e-12)
    assert first["tokens_per_sec_per_gpu"] == pytest.approx(4 * 16 / seconds, rel=1e-9)
    assert "load_balancing_loss" in first and first["params_norm"] > 0
    assert set(first["timers_ms"]) >= {"forward-backward", "optimizer"}
    line = next(x for x in lines if "iteration        3/" in x)
    assert f"MFU: {100 * first['mfu']:.1f}%" in line and " num zeros: " in line
    assert line.index("throughput per GPU") < line.index("MFU") < line.index("tokens per second")
    assert any(x.startswith("[Rank 0] (after 3 iterations) memory (MB)") for x in lines)
    assert any("\n    forward-backward ...." in x for x in lines)

    perf = json.loads(summary.read_text())
    assert perf["iterations"] == 6 and perf["warmup_iterations"] == 1
    assert perf["tokens_per_sec_per_gpu"] == pytest.approx(
        4 * 16 / perf["iteration_time_mean_s"], rel=1e-9)
    assert perf["mfu"] == pytest.approx(perf["tflops_per_gpu"] / 0.5, rel=1e-12)
    assert perf["iteration_time_median_s"] > 0 and perf["peak_memory_mb"] > 0
    assert perf["layout"]["world_size"] == 1 and perf["layout"]["precision"] == "float32"


def test_tensorboard_leaves_out_what_is_not_asked_for(tmp_path):
    pretrain(parse_args(TINY + ["--train-iters", "3", "--tensorboard-dir", str(tmp_path),
                                "--no-log-loss-scale-to-tensorboard"]), log=lambda line: None)
    scalars = _scalars(tmp_path)
    assert "lm loss" in scalars and "lm loss validation" in scalars
    for tag in ["loss-scale", "throughput", "mfu", "iteration-time", "forward-backward-time",
                "mem-max-rss-bytes", "lm loss validation ppl", "params-norm", "num-zeros"]:
        assert tag not in scalars, tag


def test_wandb_without_the_package_is_one_line(capsys, monkeypatch):
    import importlib.util
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    from paratron.cli.train import main
    assert main(TINY + ["--wandb-project", "p"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install wandb" in err


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    pretrain(parse_args(TINY + ["--train-iters", "3", "--wandb-project", "paratron-test",
                                "--wandb-exp-name", "tiny", "--wandb-save-dir", str(tmp_path)]),
             log=lambda line: None)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())


@pytest.mark.parametrize("extra, message", [
    (["--peak-tflops", "0"], "--peak-tflops must be positive"),
    (["--loss-spike-factor", "0.5"], "--loss-spike-factor must be above 1"),
    (["--straggler-threshold", "-1"], "--straggler-threshold must be 0 or more")])
def test_metric_flag_refusals(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(TINY + extra)


def test_metrics_jsonl_that_is_a_folder_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        parse_args(TINY + ["--metrics-jsonl", str(tmp_path)])


# ---------------------------------------------------------------- preprocess progress
def _ids_file(tmp_path, n=600):
    path = tmp_path / "ids.txt"
    path.write_text("".join(f"{i % 90} {i % 7} 3\n" for i in range(n)))
    return str(path)


def test_preprocess_progress_bar_reports_documents_per_second(tmp_path):
    out, lines = io.StringIO(), []
    result = preprocess_data(_ids_file(tmp_path), str(tmp_path / "o"), "NullTokenizer",
                             vocab_size=100, log=lines.append, log_interval=100,
                             progress=True, progress_file=out)
    assert result.documents == 600
    bar = out.getvalue()
    assert "600" in bar and "docs/s" in bar
    assert not any(x.startswith("Processed") for x in lines)  # the bar replaces them
    assert lines[-1].startswith("Done: 600 documents")


def test_preprocess_without_a_terminal_prints_lines_not_a_bar(tmp_path):
    out, lines = io.StringIO(), []  # a StringIO is not a terminal
    preprocess_data(_ids_file(tmp_path), str(tmp_path / "o"), "NullTokenizer",
                    vocab_size=100, log=lines.append, log_interval=200, progress_file=out)
    assert out.getvalue() == ""
    assert [x.split(" (")[0] for x in lines if x.startswith("Processed")] == [
        "Processed 256 documents", "Processed 512 documents", "Processed 600 documents"]
