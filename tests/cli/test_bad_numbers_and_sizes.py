"""Off the happy path: bad numbers, absurd sizes and generation without training settings.

Every case is refused in one line naming the flag, key or file (never a traceback, never
a run that starts with a NaN learning rate), sizes are compared with the device's memory
before anything is allocated, and `paratron generate` runs on a folder written by
`paratron convert --loader hf --saver paratron`. Commands that the code before these
checks would let allocate gigabytes run in a subprocess with a capped address space.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import pytest

from paratron.cli.convert import main as convert_main
from paratron.cli.generate import main as generate_main
from paratron.cli.train import main as train_main
from paratron.cli.args import parse_args
from paratron.options import ConfigError

TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--micro-batch-size 1 --global-batch-size 1 --train-iters 1 --lr 1e-3 --mock-data "
        "--vocab-size 128 --tokenizer-type NullTokenizer --device cpu --num-workers 0 "
        "--eval-iters 0").split()
LIMIT_BYTES = 6 << 30  # address space of a subprocess: a runaway allocation fails fast


def _one_line(err: str, prog: str, *fragments: str) -> None:
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def _run_limited(*argv: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))

    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "paratron", *argv], capture_output=True,
                          text=True, timeout=timeout, preexec_fn=cap,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               **{k: v for k, v in os.environ.items()
                                  if k in ("PYTHONPATH", "HOME")}})
    return done, time.monotonic() - start


# ------------------------------------------------------------------ 11: bad numbers
@pytest.mark.parametrize("extra,fragment", [
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--clip-grad", "nan"], "--clip-grad"),
    (["--seed", "-1"], "--seed must be 0 or more"),
    (["--seed", "1e20"], "--seed must be at most"),
    (["--seed", "100000000000000000000"], "--seed must be at most"),
    (["--weight-decay", "-1"], "--weight-decay must be 0 or more"),
    (["--init-method-std", "-1"], "--init-method-std must be 0 or more"),
    (["--group-query-attention", "--num-query-groups", "0"], "--num-query-groups must be positive"),
    (["--lr-warmup-fraction", "nan"], "--lr-warmup-fraction"),
    (["--adam-beta2", "1"], "--adam-beta2"),
])
def test_bad_numbers_are_one_line(extra, fragment, capsys):
    assert train_main(TINY + extra) == 2
    out, err = capsys.readouterr()
    _one_line(err, "paratron train", fragment)


@pytest.mark.parametrize("text,fragment", [
    ("lr: .nan\n", "lr"),
    ("seed: 1.0e+20\n", "--seed must be at most"),
])
def test_bad_numbers_in_a_config_file_are_one_line(text, fragment, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert train_main(TINY + ["--config", str(path)]) == 2
    _one_line(capsys.readouterr().err, "paratron train", fragment)


def test_values_from_a_recorded_config_are_checked_too():
    from paratron.config import config_from_dict

    with pytest.raises(ConfigError, match="--num-attention-heads is not an integer"):
        config_from_dict(dict(num_layers=2, hidden_size=32, num_attention_heads="four",
                              seq_length=16, train_iters=1, lr=1e-3))


# ------------------------------------------------------------------ HF folders
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny random Llama (rope, GQA) saved by transformers."""
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("hf")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def converted(hf_folder, tmp_path_factory):
    save = tmp_path_factory.mktemp("converted") / "ckpt"
    assert convert_main(["--model-type", "GPT", "--loader", "hf", "--saver", "paratron",
                         "--load-dir", str(hf_folder), "--save-dir", str(save)]) == 0
    return save


def _with_config(hf_folder, tmp_path, **changes):
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


NULL = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "250"]


@pytest.mark.parametrize("changes,fragment", [
    (dict(num_attention_heads="four"), "num_attention_heads 'four' is not an integer"),
    (dict(num_key_value_heads=0), "num_key_value_heads 0 must be positive"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps nan is not a finite number"),
    (dict(rope_theta="abc"), "rope_theta 'abc' is not a number"),
])
def test_bad_numbers_in_hf_config_are_one_line(changes, fragment, hf_folder, tmp_path, capsys):
    folder = _with_config(hf_folder, tmp_path, **changes)
    save = tmp_path / "out"
    assert convert_main(["--model-type", "GPT", "--loader", "hf", "--saver", "paratron",
                         "--load-dir", str(folder), "--save-dir", str(save)]) == 2
    _one_line(capsys.readouterr().err, "paratron convert", "config.json", fragment)
    assert not save.exists()
    assert generate_main(["--hf", str(folder), "--prompt", "1 2", "--max-new-tokens", "2",
                          *NULL]) == 2
    _one_line(capsys.readouterr().err, "paratron generate", "config.json", fragment)


# ------------------------------------------------------------------ 13: generation
def test_generate_needs_no_training_settings(converted, capsys):
    """A checkpoint written by `paratron convert` records no iterations or learning rate."""
    code = generate_main(["--load", str(converted), "--prompt", "1 2 3",
                          "--max-new-tokens", "3", "--ignore-eos", "--json", *NULL])
    out, err = capsys.readouterr()
    assert code == 0, err
    row = json.loads(out)
    assert len(row["token_ids"]) == 3 and all(0 <= t < 256 for t in row["token_ids"])


@pytest.mark.parametrize("prompt,bad", [("1 2 300", "300"), ("1 -2", "-2")])
def test_prompt_id_beyond_the_vocabulary_is_one_line(prompt, bad, converted, capsys):
    argv = ["--load", str(converted), "--prompt", prompt, "--max-new-tokens", "2",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "400"]
    assert generate_main(argv) == 2
    last = capsys.readouterr().err.splitlines()[-1] + "\n"  # after the "loaded" note
    _one_line(last, "paratron generate", f"token id {bad}", "vocabulary (0 to 255)")


@pytest.mark.parametrize("tokens", ["1e9", "1000000000"])
def test_generation_longer_than_memory_is_one_line(tokens, converted):
    done, seconds = _run_limited("generate", "--load", str(converted), "--prompt", "1 2",
                                 "--max-new-tokens", tokens, *NULL)
    assert done.returncode == 2 and done.stdout == "", done.stderr[-2000:]
    _one_line(done.stderr.splitlines()[-1] + "\n", "paratron generate", "--max-new-tokens",
              "GiB")
    assert seconds < 30


# ------------------------------------------------------------------ 9: sizes
@pytest.mark.parametrize("extra", [
    ["--num-layers", "100000", "--hidden-size", "65536", "--num-attention-heads", "64"],
    ["--seq-length", "1e9", "--position-embedding-type", "rope"],
    ["--seq-length", "1e9", "--max-position-embeddings", "1000000000"],
])
def test_sizes_beyond_the_device_are_refused_before_allocating(extra):
    from paratron.training.memory_plan import check_fits_device

    start = time.monotonic()
    cfg = parse_args(TINY + extra)
    with pytest.raises(ConfigError, match=r"needs at least [\d.]+ GiB per rank .* the cpu "
                                          r"has [\d.]+ GiB") as info:
        check_fits_device(cfg)
    assert "\n" not in str(info.value)
    assert time.monotonic() - start < 10


def test_a_tiny_run_fits():
    from paratron.training.memory_plan import check_fits_device

    check_fits_device(parse_args(TINY))


def test_plan_answers_an_absurd_model_in_seconds():
    done, seconds = _run_limited(
        "plan", "--num-gpus", "8", "--gpu-memory-gb", "80", "--num-layers", "100000",
        "--hidden-size", "65536", "--num-attention-heads", "64", "--seq-length", "4096",
        "--global-batch-size", "8", "--vocab-size", "1000", timeout=40)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stdout.count("\n") == 1 and "none fits" in done.stdout
    assert seconds < 30


def _alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\ndata-path: *a{levels - 1}\n"


@pytest.mark.parametrize("text,fragment", [
    (_alias_bomb(), "aliases"),
    ("data-path: &x [*x]\n", "alias"),
    ("data-path: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
], ids=["alias bomb", "recursive alias", "deep nesting"])
def test_hostile_config_files_are_one_line(text, fragment, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    done, seconds = _run_limited("train", *TINY, "--config", str(path))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    _one_line(done.stderr.splitlines()[-1] + "\n", "paratron train", str(path), fragment)
    assert seconds < 30


def test_config_file_size_is_capped(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_text("# padding\n" * 200_000)
    assert train_main(TINY + ["--config", str(path)]) == 2
    _one_line(capsys.readouterr().err, "paratron train", str(path), "MiB")


@pytest.mark.parametrize("flags", [["--num-layers", "100000", "--hidden-size", "65536",
                                    "--num-attention-heads", "64"],
                                   ["--seq-length", "1e9", "--max-position-embeddings", "1e9"]])
def test_train_refuses_a_run_beyond_the_device_in_one_line(flags):
    """`paratron train` itself runs the check, before any process group or tensor."""
    base = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
            "--max-position-embeddings 16 --vocab-size 64 --mock-data --device cpu "
            "--micro-batch-size 1 --global-batch-size 1 --lr 1e-3 --train-iters 1").split()
    done, seconds = _run_limited("train", *base, *flags)
    _one_line(done.stderr, "paratron train", "GiB per rank")
    assert done.returncode == 2 and seconds < 60
