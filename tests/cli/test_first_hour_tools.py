"""A new user's first hour with the tools around training (issue 21): Megatron's
pretrain_gpt.py script as written, weights other accounts can read, Ctrl-C under
torchrun, and `generate`, `convert` and `--data-path` as a first run meets them."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.cli_utils import ENV, TINY_TRAIN
from paratron.checkpoint import find_latest_valid, read_latest
from paratron.cli import convert
from paratron.data.errors import DataError
from paratron.data.indexed_dataset import IndexedDatasetWriter

ROOT = Path(__file__).resolve().parents[2]
EOD = "<|endoftext|>"
MODEL = ("--num-layers 1 --hidden-size 16 --num-attention-heads 2 --seq-length 8 "
         "--max-position-embeddings 8 --device cpu --micro-batch-size 1 "
         "--global-batch-size 2 --lr 1e-3 --num-workers 0 --eval-iters 0 "
         "--log-interval 1").split()


def _paratron(*argv, umask=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "paratron", *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout, env=ENV,
                          preexec_fn=None if umask is None else lambda: os.umask(umask))


@pytest.fixture(scope="module")
def gpt2_corpus(tmp_path_factory):
    """GPT-2 vocab.json + merges.txt (the 256 byte symbols and <|endoftext|>, no merges)
    and a corpus of those ids, as a seed script's --vocab-file/--merge-file/--data-path."""
    from tokenizers import pre_tokenizers

    root = tmp_path_factory.mktemp("gpt2")
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[EOD] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    writer = IndexedDatasetWriter(str(root / "corpus_text_document.bin"), np.uint16)
    rng = np.random.default_rng(0)
    for _ in range(40):
        writer.add_document(list(rng.integers(0, 256, 30)) + [vocab[EOD]])
    writer.finalize(str(root / "corpus_text_document.idx"))
    return root


def _gpt2_flags(root: Path) -> list[str]:
    return ["--vocab-file", root / "vocab.json", "--merge-file", root / "merges.txt",
            "--data-path", root / "corpus_text_document", "--split", "98,2,0"]


# ------------------------------------------------------------------ item 2
def test_pretrain_gpt_script_takes_gpt2_files_without_tokenizer_type(gpt2_corpus, tmp_path):
    """Megatron's pretrain_gpt.py defaults --tokenizer-type to GPT2BPETokenizer; seed
    scripts rely on it."""
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain_gpt.py"), *MODEL,
                           *map(str, _gpt2_flags(gpt2_corpus)), "--train-iters", "1",
                           "--data-cache-path", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "iteration        1/       1" in proc.stdout


def test_explicit_tokenizer_type_is_kept():
    from paratron.cli.args import parse_args

    cfg = parse_args([*MODEL, "--train-iters", "1", "--vocab-file", "v.json", "--merge-file",
                      "m.txt", "--tokenizer-type", "HuggingFaceTokenizer"], check=False)
    assert cfg.data.tokenizer_type == "HuggingFaceTokenizer"
    cfg = parse_args([*MODEL, "--train-iters", "1", "--vocab-file", "v.json"], check=False)
    assert cfg.data.tokenizer_type is None  # one file alone names no tokenizer


# ------------------------------------------------------------------ item 7
def _private(folder: Path, umask: int) -> list[str]:
    """Files under `folder` whose permissions are not those the umask gives."""
    want = 0o666 & ~umask
    return [f"{p.relative_to(folder)} {stat.S_IMODE(p.stat().st_mode):o}"
            for p in sorted(folder.rglob("*")) if p.is_file()
            and stat.S_IMODE(p.stat().st_mode) != want]


def test_written_files_follow_the_umask(gpt2_corpus, tmp_path):
    """Checkpoint shards, RNG files, the data cache and both conversions' weights are
    readable by whom the umask allows, like the logs (safetensors creates 0600)."""
    umask = 0o002
    save, cache = tmp_path / "ckpt", tmp_path / "cache"
    proc = _paratron("train", *MODEL, *_gpt2_flags(gpt2_corpus), "--tokenizer-type",
                     "GPT2BPETokenizer", "--train-iters", "1", "--save", save,
                     "--data-cache-path", cache, umask=umask)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(save.rglob("rng_rank_*.safetensors")) and any(cache.rglob("*.npy"))
    hf, back = tmp_path / "hf", tmp_path / "back"
    previous = os.umask(umask)  # the conversions run here, to spare two interpreters
    try:
        for loader, saver, src, dst in (("paratron", "hf", save, hf),
                                        ("hf", "paratron", hf, back)):
            assert convert.main(["--model-type", "GPT", "--loader", loader, "--saver", saver,
                                 "--load-dir", str(src), "--save-dir", str(dst)]) == 0
    finally:
        os.umask(previous)
    assert (hf / "model.safetensors").is_file() and any(back.rglob("model_part_*"))
    assert [p for root in (save, cache, hf, back) for p in _private(root, umask)] == []


# ------------------------------------------------------------------ item 8
def _torchrun_and_signal(save: Path, sig: int, *flags) -> tuple[subprocess.Popen, str]:
    """2 ranks under torchrun, `sig` sent to torchrun itself once training runs (as a
    scheduler or Ctrl-C does); its whole output."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                             "2", "-m", "paratron", "train", *TINY_TRAIN, "--train-iters",
                             "100000", "--save", str(save), "--save-interval", "100000",
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)
    lines, deadline = [], time.monotonic() + 120
    for line in proc.stdout:
        lines.append(line)
        if "lm loss" in line or time.monotonic() > deadline:
            break
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return proc, "".join(lines) + out


def test_torchrun_ctrl_c_with_exit_signal_handler_saves_on_every_rank(tmp_path):
    """What the README says of torchrun: the ranks finish the iteration, save and exit
    cleanly (torchrun kills none of them); torchrun itself reports the signal."""
    save = tmp_path / "ckpt"
    proc, out = _torchrun_and_signal(save, signal.SIGINT, "--exit-signal-handler")
    iteration = read_latest(save)
    assert iteration and f"exiting program at iteration {iteration}: received SIGINT" \
        in out, out[-3000:]
    assert find_latest_valid(save)[0] == iteration
    # No rank failed or was killed: the one traceback is torchrun's own report.
    assert "SIGKILL" not in out and out.count("Traceback") == 1, out[-3000:]
    assert proc.returncode == 1  # torchrun's own SignalException, as the README says


def test_torchrun_ctrl_c_without_handler_is_one_line_per_rank(tmp_path):
    proc, out = _torchrun_and_signal(tmp_path / "ckpt", signal.SIGINT)
    assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if "stopped by SIGINT" in line]
    assert sorted(line.split()[3] for line in lines) == ["0", "1"], out[-3000:]
    assert all(" iteration" in line and "--exit-signal-handler" in line for line in lines)


# ------------------------------------------------------------------ item 10: generate
def test_completion_text_keeps_the_tokenizers_spacing_and_drops_the_stop_token(gpt2_corpus):
    from paratron.data.tokenizer import build_tokenizer
    from paratron.inference import completion_text

    null = build_tokenizer("NullTokenizer", vocab_size=200)
    assert "1 2 3" + completion_text(null, [1, 2, 3], [114]) == "1 2 3 114"
    gpt2 = build_tokenizer("GPT2BPETokenizer", vocab_file=str(gpt2_corpus / "vocab.json"),
                           merge_file=str(gpt2_corpus / "merges.txt"))
    prompt, new = gpt2.encode("Hello"), gpt2.encode(" world")
    assert completion_text(gpt2, prompt, new + [gpt2.eod], [gpt2.eod]) == " world"
    assert completion_text(gpt2, prompt, new, [gpt2.eod]) == " world"


def test_generate_separates_prompts_with_a_default_length(tmp_path, capsys):
    from paratron.cli import generate

    save = tmp_path / "ckpt"
    proc = _paratron("train", *TINY_TRAIN, "--train-iters", "1", "--save", save)
    assert proc.returncode == 0, proc.stderr[-2000:]
    capsys.readouterr()
    code = generate.main(["--load", str(save), "--prompt", "1 2 3", "--prompt", "4 5",
                          "--ignore-eos"])
    out, err = capsys.readouterr()
    assert code == 0, err
    first, second = out.split("-" * 40 + "\n")
    assert first.startswith("1 2 3 ") and second.startswith("4 5 ")
    # No --max-new-tokens: the default, capped to the tiny model's 8 learned positions.
    assert len(first.split()) == 8 and len(second.split()) == 2 + 5, out


# ------------------------------------------------------------------ item 10: convert
def test_convert_into_an_existing_folder_refuses_before_reading(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    proc = _paratron("convert", "--model-type", "GPT", "--loader", "hf", "--saver",
                     "paratron", "--load-dir", tmp_path / "missing", "--save-dir",
                     tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--save-dir" in proc.stderr and "already exists" in proc.stderr, proc.stderr


# ------------------------------------------------------------------ item 10: --data-path
@pytest.mark.parametrize("given", ["corpus", "corpus_text_document.bin", "corpus_text_doc"])
def test_data_path_suggests_the_existing_prefix(gpt2_corpus, given):
    from paratron.data.gpt_dataset import open_corpus

    with pytest.raises(DataError) as error:
        open_corpus(str(gpt2_corpus / given))
    assert f"did you mean --data-path {gpt2_corpus / 'corpus_text_document'}?" \
        in str(error.value)


def test_ctrl_c_of_a_single_process_run_is_one_line(tmp_path):
    """`paratron train` on one process, Ctrl-C without --exit-signal-handler: one line and
    exit status 130, as a shell reports an interrupted command, not a traceback."""
    import signal
    import subprocess
    import sys
    import time
    from tests.helpers.cli_utils import ENV, TINY_TRAIN
    # As from a terminal: a shell's background job (`pytest ... &`) runs with SIGINT
    # ignored, which a child would inherit.
    proc = subprocess.Popen([sys.executable, "-m", "paratron", "train", *TINY_TRAIN,
                             "--train-iters", "100000", "--log-interval", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # wait until it trains
        if "iteration" in line and "lm loss" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-3000:]
    assert "interrupted" in err
