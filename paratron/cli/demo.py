"""`paratron demo`: a short, real training run that needs nothing downloaded.

The corpus is the documentation every Python installation ships (the docstrings of
its standard library); a byte-level BPE is trained on it on the spot with
`tokenizers`; the text is preprocessed into Megatron `.bin/.idx` files; a small
Llama-style model trains on it (about two minutes on two CPU cores) behind a progress
bar, is saved as a checkpoint, and completes a few prompts. The demo ends with the
commands that go further from there: generate, convert to Hugging Face, a real run.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import shlex
import shutil
import sys
import time

# Standard-library modules with plenty of English prose in their docstrings.
CORPUS_MODULES = [
    "argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
    "functools", "heapq", "http.client", "http.server", "inspect", "io", "itertools",
    "json", "logging", "multiprocessing", "os", "pathlib", "pickle", "random", "re",
    "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "xml.dom.minidom", "zipfile",
]


VOCAB_SIZE = 2048
# Prompts in the corpus's own register, and how they are completed: sampled (greedy
# decoding of a small model repeats itself), reproducibly, and printed as the command
# that gives the same text.
PROMPTS = ["Return the", "If the file", "This module provides"]
SAMPLING = {"--max-new-tokens": 32, "--top-k": 20, "--temperature": 0.8, "--seed": 1234}


def stdlib_documented() -> list[tuple[str, str]]:
    """(qualified name, docstring on one line) of each documented module, class, function
    and method of CORPUS_MODULES, in a fixed order, repeats dropped. The examples build
    their sample corpus and instruction data from it too (examples/sample_data.py)."""
    found: dict[str, str] = {}
    for name in CORPUS_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for qualname, obj in _documented_members(name, module):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                found.setdefault(" ".join(doc.split()), qualname)
    return [(qualname, doc) for doc, qualname in found.items()]


def _documented_members(name: str, module):
    """The module, its classes and functions, and the classes' methods."""
    yield name, module
    for attr, obj in sorted(vars(module).items()):
        if inspect.isclass(obj) or inspect.isfunction(obj):
            yield f"{name}.{attr}", obj
        if inspect.isclass(obj):
            for method, member in sorted(vars(obj).items()):
                if inspect.isfunction(member):
                    yield f"{name}.{attr}.{method}", member


def stdlib_docstrings() -> list[str]:
    """One document per module/class/function docstring, in a fixed order."""
    return [doc for _, doc in stdlib_documented()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="paratron demo", description=__doc__)
    parser.add_argument("--workdir", default="paratron-demo",
                        help="where the corpus, tokenizer, data files, checkpoint and logs go")
    parser.add_argument("--train-iters", type=int, default=300)
    args = parser.parse_args(argv)
    if args.train_iters < 1:
        parser.error(f"--train-iters must be positive, got {args.train_iters}")

    from paratron.checkpoint.files import CheckpointError
    from paratron.options import ConfigError
    from paratron.data.errors import DataError

    try:
        return run(args)
    except (ConfigError, DataError, CheckpointError, OSError, ValueError) as error:
        sys.stdout.flush()
        sys.stderr.write(f"paratron demo: error: {' '.join(str(error).split())}\n")
        return 2


def run(args) -> int:
    """Data, training behind a progress bar, a few completions, what to do next."""
    import torch

    from paratron.cli.args import parse_args
    from paratron.training.pretrain import pretrain

    if "OMP_NUM_THREADS" not in os.environ:
        # The model's matrices are too small for threads to help, and on a busy machine
        # threads spin waiting for each other: one thread ran 240 iterations in 50 s on
        # two busy cores where two threads took 400 s.
        torch.set_num_threads(1)
    start = time.time()
    data_prefix, tokenizer_dir = prepare_data(args.workdir)
    checkpoint = os.path.join(args.workdir, "checkpoint")
    shutil.rmtree(checkpoint, ignore_errors=True)  # the previous demo's; this one retrains
    flags = training_flags(args.train_iters, data_prefix, tokenizer_dir, checkpoint)
    print(f"demo: training a 4-layer model for {args.train_iters} iterations (paratron train "
          f"{' '.join(flags[:12])} ...)", flush=True)
    progress = Progress(args.train_iters)
    try:
        state = pretrain(parse_args(flags), log=progress.log)
    finally:
        progress.close()
    tail = state.losses[-10:]
    print(f"demo: lm loss {state.losses[0]:.2f} -> {sum(tail) / len(tail):.2f}; checkpoint "
          f"in {checkpoint}")
    print("demo: the model completes a few prompts:")
    for prompt, text in complete(checkpoint, PROMPTS):
        print("  " + " ".join((prompt + text).split()))
    print(f"demo: done in {time.time() - start:.0f} s. Going further:\n"
          + "\n".join(f"  {command}" for command in next_commands(args.workdir)))
    return 0


def prepare_data(workdir: str) -> tuple[str, str]:
    """Corpus, tokenizer and `.bin/.idx` files in `workdir`: (data prefix, tokenizer)."""
    from paratron.data.preprocess import preprocess_data
    from paratron.data.tokenizer import train_bpe_tokenizer

    os.makedirs(workdir, exist_ok=True)
    corpus = os.path.join(workdir, "python_docs.txt")
    docs = stdlib_docstrings()
    with open(corpus, "w", encoding="utf-8") as fh:
        fh.write("\n".join(docs) + "\n")
    size_mb = os.path.getsize(corpus) / 1e6
    tokenizer_dir = train_bpe_tokenizer([corpus], os.path.join(workdir, "tokenizer"),
                                        vocab_size=VOCAB_SIZE)
    prefix = os.path.join(workdir, "python_docs")
    preprocess_data(corpus, prefix, "HuggingFaceTokenizer", tokenizer_model=tokenizer_dir,
                    append_eod=True, workers=1, log=lambda line: None)
    print(f"demo: {len(docs)} documents ({size_mb:.1f} MB) from the Python standard "
          f"library's docstrings, a {VOCAB_SIZE}-token BPE trained on them, "
          f"{prefix}_text_document.bin/.idx", flush=True)
    return prefix + "_text_document", tokenizer_dir


def training_flags(iters: int, data_prefix: str, tokenizer_dir: str, save: str) -> list[str]:
    """The `paratron train` flags of the demo run (model first)."""
    return [
        "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
        "--group-query-attention", "--num-query-groups", "2", "--swiglu",
        "--normalization", "RMSNorm", "--position-embedding-type", "rope",
        "--disable-bias-linear", "--untie-embeddings-and-output-weights",
        "--attention-dropout", "0", "--hidden-dropout", "0",
        "--seq-length", "128", "--micro-batch-size", "8", "--global-batch-size", "16",
        "--train-iters", str(iters), "--lr", "3e-3", "--min-lr", "3e-4",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", str(min(20, iters // 5)),
        "--weight-decay", "0.1", "--adam-beta2", "0.95", "--clip-grad", "1.0",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir,
        "--data-path", data_prefix, "--split", "98,2,0",
        "--data-cache-path", os.path.join(os.path.dirname(data_prefix), "index-cache"),
        "--log-interval", "1", "--eval-interval", str(iters), "--eval-iters", "2",
        "--save", save,
    ]


class Progress:
    """A progress bar fed by the training log: each iteration line moves it; the
    validation result and warnings are printed; the settings block and per-iteration
    details are left out. On a terminal the bar redraws in place, elsewhere (a log
    file, a CI job) a line is printed every tenth of the run."""

    WIDTH = 30

    def __init__(self, total: int, out=None):
        self.total, self.out = total, out or sys.stdout
        self.tty = self.out.isatty()
        self.start, self.shown = time.time(), 0

    def log(self, line: str) -> None:
        match = re.search(r"iteration\s+(\d+)/\s*\d+ .*lm loss: (\S+) \|", line)
        if match:
            self.update(int(match.group(1)), float(match.group(2)))
        elif "validation loss" in line or "warning" in line.lower():
            self.write(" ".join(line.split("|")[:3]).strip())

    def update(self, iteration: int, loss: float) -> None:
        if not self.tty and iteration < self.total and \
                iteration * 10 // self.total == self.shown * 10 // self.total:
            return
        self.shown = iteration
        done = self.WIDTH * iteration // self.total
        elapsed = time.time() - self.start
        left = elapsed / iteration * (self.total - iteration)
        bar = (f"demo: [{'#' * done}{'.' * (self.WIDTH - done)}] {iteration}/{self.total} "
               f"lm loss {loss:.2f}, {elapsed:.0f} s, ~{left:.0f} s left")
        self.out.write(("\r" + bar) if self.tty else bar + "\n")
        self.out.flush()

    def write(self, text: str) -> None:
        self.close()
        print(f"demo: {text}", file=self.out, flush=True)

    def close(self) -> None:
        if self.tty and self.shown:
            self.out.write("\n")
            self.shown = 0


def complete(checkpoint: str, prompts: list[str]) -> list[tuple[str, str]]:
    """(prompt, completion) from the saved checkpoint, one prompt at a time with
    `paratron generate`'s defaults and SAMPLING: what its command prints for each."""
    from paratron.inference import (Sampling, checkpoint_tokenizer, completion_text, generate,
                                    load_paratron_model)
    from paratron.parallel.process_groups import ProcessGroups

    cfg, model, _ = load_paratron_model(checkpoint, ProcessGroups.build(1, 1),
                                        log=lambda line: None)
    tokenizer = checkpoint_tokenizer(checkpoint, cfg)
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        sampling = Sampling(top_k=SAMPLING["--top-k"], temperature=SAMPLING["--temperature"],
                            seed=SAMPLING["--seed"])
        new = generate(model, [ids], SAMPLING["--max-new-tokens"], sampling=sampling,
                       eod=[tokenizer.eod], vocab_size=tokenizer.vocab_size)[0]
        out.append((prompt, completion_text(tokenizer, ids, new, [tokenizer.eod])))
    return out


def next_commands(workdir: str) -> list[str]:
    """Generate with the demo's model, convert it to Hugging Face, and a real run."""
    folder = shlex.quote(workdir)
    sampling = " ".join(f"{flag} {value}" for flag, value in SAMPLING.items())
    return [
        f"paratron generate --load {folder}/checkpoint --prompt {shlex.quote(PROMPTS[0])} "
        f"{sampling}",
        f"paratron convert --model-type GPT --loader paratron --saver hf "
        f"--load-dir {folder}/checkpoint --save-dir {folder}/hf",
        "INPUT=your_corpus.jsonl bash examples/gpt2_pretrain/run.sh   "
        "# your data, TP2 x PP2 (README: Examples)",
    ]


if __name__ == "__main__":
    sys.exit(main())
