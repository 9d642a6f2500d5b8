"""A new user's first hour: the examples and the demo work from a fresh clone.

A fresh clone has no ../shared/data beside it, so each example is run as the README
shows it from a copy of the repository with nothing next to it (only shorter), making
its input on the spot. The DeepSeek-V2 export must keep the base model's context
length and vocabulary. `paratron demo` must leave a checkpoint and end with text its
model wrote and the commands that go further.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
# What a clone holds that the examples use (tests/ and benchmarks/ are not needed).
CLONED = ("paratron", "examples", "pyproject.toml", "README.md", "pretrain_gpt.py")
# Variables a developer's shell may set that would point an example at other data.
USER_DATA = ("INPUT", "SFT_INPUT", "VOCAB_FILE", "MERGE_FILE", "DATA", "HF_MODEL", "OUT")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@pytest.fixture
def clone(tmp_path) -> Path:
    """A copy of the repository in a folder with no ../shared beside it."""
    repo = tmp_path / "fresh" / "paratron"
    repo.mkdir(parents=True)
    for name in CLONED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, repo / name)
    assert not (repo.parent / "shared").exists()
    return repo


def _env(repo: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in USER_DATA}
    env.update(PYTHONPATH=str(repo), OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run_example(repo: Path, script: str, timeout: int = 600, **extra) -> str:
    """`bash examples/<script>` from the clone's root, as the README runs it."""
    proc = subprocess.run(["bash", f"examples/{script}"], cwd=repo, env=_env(repo, **extra),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.stdout


def _losses(output: str) -> dict[int, float]:
    """{iteration: lm loss} of the training log lines."""
    return {int(i): float(x) for i, x in
            re.findall(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: (\S+) \|", output)}


def _hf_losses(output: str) -> dict[str, float]:
    return {Path(name).name: float(value)
            for name, value in re.findall(r"^(\S+): loss (\S+) over", output, re.M)}


# ------------------------------------------------------------------ item 4: examples
# About 30 s (GPT-2), 30 s (Qwen) and 60 s (DeepSeek-V2) on two idle cores.
@pytest.mark.slow
def test_gpt2_example_runs_from_a_fresh_clone(clone):
    """No INPUT, no GPT-2 files: a sample corpus and a BPE in GPT-2's file format are
    made on the spot; 4 processes at TP2 x PP2 train on them and the loss falls."""
    out = _run_example(clone, "gpt2_pretrain/run.sh", TRAIN_ITERS=6, LOG_INTERVAL=2,
                       EVAL_INTERVAL=6)
    output = clone / "gpt2-pretrain-output"
    assert (output / "sample" / "corpus.jsonl").stat().st_size > 0
    assert (output / "tokenizer" / "gpt2-vocab.json").is_file()
    assert (output / "corpus_text_document.bin").stat().st_size > 0
    losses = _losses(out)
    assert max(losses) == 6 and all(math.isfinite(x) for x in losses.values())
    assert losses[6] < losses[min(losses)]


@pytest.mark.slow
def test_qwen_example_runs_from_a_fresh_clone(clone):
    """MODEL=qwen3 as the README runs it: sample corpus, tiny HF checkpoint, convert,
    train at TP2, export; transformers finds the trained model better than the start."""
    out = _run_example(clone, "qwen_continued_pretrain/run.sh", MODEL="qwen3",
                       TRAIN_ITERS=6, LOG_INTERVAL=3)
    assert (clone / "qwen-cpt-output" / "sample" / "corpus.jsonl").is_file()
    assert max(_losses(out)) == 6
    losses = _hf_losses(out)
    assert losses["hf"] < losses["hf-start"]


@pytest.mark.slow
def test_deepseek_example_runs_from_a_fresh_clone_and_export_keeps_the_model(clone):
    """Sample corpus and Alpaca-format instructions made on the spot; pretraining at
    PP2 x EP2, SFT, export. The export keeps the base model's context length,
    vocabulary and YaRN settings (item 5), and its loss is lower."""
    out = _run_example(clone, "deepseek_v2/run.sh", PRETRAIN_ITERS=2, SFT_ITERS=3)
    output = clone / "deepseek-v2-output"
    assert (output / "sample" / "alpaca.json").is_file()
    pretrain, sft = out.split("== SFT on")
    assert max(_losses(pretrain)) == 2 and max(_losses(sft)) == 3
    start, exported = (json.loads((output / name / "config.json").read_text())
                       for name in ("hf-start", "hf"))
    for key in ("max_position_embeddings", "vocab_size"):
        assert exported[key] == start[key], key
    assert _yarn(exported) == _yarn(start)
    losses = _hf_losses(out)
    assert losses["hf"] < losses["hf-start"]


def _yarn(config: dict) -> dict:
    """The YaRN settings of a config.json (transformers 5 calls them rope_parameters and
    drops the legacy "type" key)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return {k: v for k, v in rope.items() if k != "type"}


def test_examples_name_the_missing_input_by_its_variable(clone, tmp_path):
    """A user's own data goes in through INPUT; a wrong path is one line naming it,
    before any sample is made."""
    missing = tmp_path / "nope.jsonl"
    for script in ("gpt2_pretrain/run.sh", "qwen_continued_pretrain/run.sh",
                   "deepseek_v2/run.sh"):
        proc = subprocess.run(["bash", f"examples/{script}"], cwd=clone,
                              env=_env(clone, INPUT=missing, SFT_INPUT=missing),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (script, proc.stderr)
        assert proc.stderr.splitlines() == [
            f"{script}: error: INPUT={missing} not found; set INPUT to your file, or unset "
            f"it to use the sample"], script
    assert not list(clone.glob("*-output")), "a refusal left files behind"


def test_every_script_an_example_names_exists():
    """Comments and commands name only scripts that are in the repository."""
    present = {p.name for p in ROOT.rglob("*") if p.suffix in (".py", ".sh")}
    for path in EXAMPLES.rglob("*"):
        if path.is_file() and path.suffix in (".py", ".sh", ".sbatch", ".json"):
            for name in re.findall(r"[\w./-]+\.(?:py|sh)\b", path.read_text()):
                assert Path(name).name in present, f"{path.relative_to(ROOT)} names {name}"


# -------------------------------------------------------- item 5: DeepSeek-V2 export
@pytest.mark.parametrize("size", ["A2.4B", "A21B", "tiny"])
def test_deepseek_launcher_keeps_the_model_context(size, tmp_path):
    """run_mcore_deepseek.sh trains with the model's max_position_embeddings (YaRN's
    4096 x 40), not SEQ_LEN, so the checkpoint and its export keep it."""
    args = (f"dsw {size} 1 8 1e-5 1e-6 128 128 bf16 1 1 1 1 true true true false false "
            f"false 100 /d /d none 10000 100 {tmp_path}").split()
    proc = subprocess.run(["bash", str(EXAMPLES / "deepseek_v2" / "run_mcore_deepseek.sh"),
                           *args], env=_env(ROOT, DRY_RUN=1, GPUS_PER_NODE=1),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    command = shlex.split(proc.stdout)
    assert command[command.index("--max-position-embeddings") + 1] == "163840"
    assert command[command.index("--seq-length") + 1] == "128"


# ------------------------------------------------------------------ item 6: the demo
@pytest.mark.slow
def test_demo_trains_saves_and_writes_text(tmp_path):
    """A shortened demo: a progress bar (not the settings block or a zero TFLOP/s), a
    checkpoint, completions by the model it trained (the printed generate command
    gives the same text from the checkpoint) and the three commands to go further."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "paratron", "demo", "--workdir", "demo",
                           "--train-iters", "12"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"demo: \[#{30}\] 12/12 lm loss \d", out), out
    assert "arguments" not in out and "TFLOP" not in out
    checkpoint = tmp_path / "demo" / "checkpoint"
    assert (checkpoint / "latest_checkpointed_iteration.txt").read_text().strip() == "12"
    lines = out.splitlines()
    first = lines.index("demo: the model completes a few prompts:") + 1
    completions = lines[first:first + 3]
    assert [line.split()[0] for line in completions] == ["Return", "If", "This"]
    assert all(len(line) > len("  This module provides") + 10 for line in completions)
    further = lines[lines.index(next(l for l in lines if "Going further" in l)) + 1:]
    assert [line.split()[:2] for line in further] == [
        ["paratron", "generate"], ["paratron", "convert"],
        ["INPUT=your_corpus.jsonl", "bash"]]
    generate = shlex.split(further[0])
    again = subprocess.run([sys.executable, "-m", "paratron", *generate[1:]], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert completions[0].strip() in " ".join(again.stdout.split())
