"""benchmarks/run.py: the tiny config through Paratron and transformers on CPU, its table,
its JSON record, and one-line refusals."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("paratron_benchmark_run", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_tiny_runs_both_paths_and_appends_a_record(bench, tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    argv = ["tiny", "--iters", "2", "--warmup", "0", "--json-out", str(out)]
    assert bench.main(argv + ["--peak-tflops", "0.5"]) == 0
    table = capsys.readouterr().out
    for row in ("tokens/s/GPU", "TFLOP/s/GPU", "MFU", "peak memory (GiB)"):
        assert row in table
    record = json.loads(out.read_text().splitlines()[-1])
    b = bench.BENCHES["tiny"]
    tokens = b.seq_length * b.global_batch_size
    for path in ("paratron", "transformers"):
        r = record["results"][path]
        assert len(r["times_s"]) == 2
        seconds = sum(r["times_s"]) / 2
        assert r["tokens_per_s_per_gpu"] == pytest.approx(tokens / seconds)
        assert r["tflops_per_gpu"] == pytest.approx(
            record["flops_per_iteration"] / seconds / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 0.5)
        assert r["peak_memory_gib"] is None  # no device allocator on a CPU
        # Both start from a random model on uniform tokens: loss near ln(vocabulary).
        assert abs(r["final_loss"] - math.log(512)) < 0.5
    for name, module in bench.OTHER_FRAMEWORKS.items():
        assert record["results"][name] in ("not installed", "installed, no runner")
    # 2 layers, hidden 64, ffn 176 (SwiGLU), 4 heads / 2 groups, vocab 512, 64 x 4 tokens:
    # Megatron's count by hand: forward 2 FLOPs per weight-token (QKV with half-size
    # key/value, projection, SwiGLU's three matrices, logits) plus the scores and the
    # weighted sum (2 x 2 s h, halved as the mask is causal); backward twice forward.
    h, f, v, s, layers = 64, 176, 512, 64, 2
    qkv_proj = h * (h + 2 * h // 2) + h * h
    per_token = layers * (2 * (qkv_proj + 3 * h * f) + 2 * 2 * s * h // 2) + 2 * h * v
    assert record["flops_per_iteration"] == pytest.approx(3 * per_token * tokens, rel=1e-9)
    assert bench.main(argv + ["--paths", "paratron", "--iters", "1"]) == 0
    assert len(out.read_text().splitlines()) == 2
    assert "not run" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["tinyy"], "unknown config 'tinyy'"),
    (["tiny", "--iters", "0"], "--iters must be positive"),
    (["tiny", "--paths", "megatron"], "--paths 'megatron'"),
    (["tiny", "--", "--cross-entropy-chunk-size", "0"], "--cross-entropy-chunk-size"),
])
def test_refusals_are_one_line(bench, capsys, argv, message):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_interleaved_steps_alternate_the_paths(bench, tmp_path, monkeypatch):
    order = []
    timed = bench._timed
    monkeypatch.setattr(bench, "_timed", lambda step, steps, device: (
        order.append(step.__qualname__), timed(step, steps, device))[1])
    out = tmp_path / "bench.jsonl"
    assert bench.main(["tiny", "--iters", "2", "--warmup", "1", "--interleave",
                       "--json-out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["interleave"] is True
    # One step of each path in turn: p, t, p, t, p, t.
    assert len(order) == 6 and len(set(order)) == 2 and order[0::2] == [order[0]] * 3
    for path in ("paratron", "transformers"):
        assert len(record["results"][path]["times_s"]) == 2
        assert record["results"][path]["peak_memory_gib"] is None
