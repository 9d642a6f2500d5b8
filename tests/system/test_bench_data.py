"""benchmarks/bench_data.py: every row timed from one interleaved run, ratios over the raw
memmap's, one JSON record."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_data.py"


def test_small_run_reports_every_loader(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("paratron_bench_data", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        out = tmp_path / "data.jsonl"
        record = module.main(["--batches", "20", "--seq-length", "64", "--tokens", "2e5",
                              "--repeats", "2", "--json-out", str(out)])
    finally:
        del sys.modules[spec.name]
    assert json.loads(out.read_text()) == record
    rows = record["rows"]
    assert list(rows) == ["raw memmap", "paratron pretraining, 0 workers (default)",
                          "paratron pretraining, 2 workers (Megatron's default)",
                          "paratron SFT packed, 0 workers (default)",
                          "paratron SFT packed, 2 workers (Megatron's default)"]
    raw = sum(rows["raw memmap"]["seconds"]) / 2  # the median of two
    for row in rows.values():
        assert len(row["seconds"]) == 2
        assert row["vs_raw"] == pytest.approx(raw / (sum(row["seconds"]) / 2))
    printed = capsys.readouterr().out
    assert "paratron pretraining, 0 workers (default)" in printed
