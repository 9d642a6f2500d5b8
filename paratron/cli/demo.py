"""`paratron demo`: a short, real training run that needs nothing downloaded.

The corpus is the documentation every Python installation ships (the docstrings of
its standard library); a byte-level BPE is trained on it on the spot with
`tokenizers`; the text is preprocessed into Megatron `.bin/.idx` files; and a small
Llama-style model trains on it with a 98/2/0 split, evaluating as it goes.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
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


def stdlib_docstrings() -> list[str]:
    """One document per module/class/function docstring, in a fixed order."""
    docs: list[str] = []
    for name in CORPUS_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objects = [module] + [obj for _, obj in sorted(vars(module).items())
                              if inspect.isclass(obj) or inspect.isfunction(obj)]
        for obj in objects:
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                docs.append(" ".join(doc.split()))
            if inspect.isclass(obj):
                for _, member in sorted(vars(obj).items()):
                    doc = inspect.getdoc(member) if inspect.isfunction(member) else None
                    if doc and len(doc) > 80:
                        docs.append(" ".join(doc.split()))
    return list(dict.fromkeys(docs))  # drop repeats, keep order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="paratron demo", description=__doc__)
    parser.add_argument("--workdir", default="paratron-demo",
                        help="where the corpus, tokenizer, data files and logs go")
    parser.add_argument("--train-iters", type=int, default=300)
    args = parser.parse_args(argv)

    from paratron.config import parse_args
    from paratron.data.preprocess import preprocess_data
    from paratron.data.tokenizer import train_bpe_tokenizer
    from paratron.training.pretrain import pretrain

    os.makedirs(args.workdir, exist_ok=True)
    corpus = os.path.join(args.workdir, "python_docs.txt")
    docs = stdlib_docstrings()
    with open(corpus, "w", encoding="utf-8") as fh:
        fh.write("\n".join(docs) + "\n")
    size_mb = os.path.getsize(corpus) / 1e6
    print(f"demo: corpus of {len(docs)} documents ({size_mb:.1f} MB) from the Python "
          f"standard library's docstrings")
    tokenizer_dir = train_bpe_tokenizer([corpus], os.path.join(args.workdir, "tokenizer"),
                                        vocab_size=4096)
    print(f"demo: trained a byte-level BPE tokenizer (4096 tokens) in {tokenizer_dir}")
    prefix = os.path.join(args.workdir, "python_docs")
    preprocess_data(corpus, prefix, "HuggingFaceTokenizer", tokenizer_model=tokenizer_dir,
                    append_eod=True, workers=1, log=lambda line: None)
    data_prefix = prefix + "_text_document"
    print(f"demo: wrote {data_prefix}.bin/.idx")
    flags = [
        "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
        "--group-query-attention", "--num-query-groups", "2", "--swiglu",
        "--normalization", "RMSNorm", "--position-embedding-type", "rope",
        "--disable-bias-linear", "--untie-embeddings-and-output-weights",
        "--attention-dropout", "0", "--hidden-dropout", "0",
        "--seq-length", "128", "--micro-batch-size", "8", "--global-batch-size", "16",
        "--train-iters", str(args.train_iters), "--lr", "2e-3", "--min-lr", "2e-4",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", "20", "--weight-decay", "0.1",
        "--adam-beta2", "0.95", "--clip-grad", "1.0",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir,
        "--data-path", data_prefix, "--split", "98,2,0",
        "--data-cache-path", os.path.join(args.workdir, "index-cache"),
        "--log-interval", "25", "--eval-interval", "100", "--eval-iters", "4",
        "--log-throughput",
    ]
    print("demo: paratron train " + " ".join(flags))
    start = time.time()
    state = pretrain(parse_args(flags), log=lambda line: print(line, flush=True)
                     if not line.startswith("  ") else None)
    first, last = state.losses[0], sum(state.losses[-25:]) / len(state.losses[-25:])
    print(f"demo: {state.iteration} iterations in {time.time() - start:.0f} s; "
          f"lm loss {first:.2f} -> {last:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
