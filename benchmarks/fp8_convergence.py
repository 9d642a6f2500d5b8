"""Does FP8 training converge like bf16? Two `paratron train` runs on real text.

    python benchmarks/fp8_convergence.py [--data-prefix PREFIX] [--out PREFIX] [--iters N]
                                         [--vocab-file F] [--merge-file F] [--log-dir DIR]

A small Llama (RMSNorm, SwiGLU, RoPE; every FP8 GEMM dimension a multiple of 16) is
trained twice with the same flags, seed and data, one run in bf16 and one with
`--bf16 --fp8-format hybrid` (e4m3 forward, e5m2 output gradients), one run after the
other, each in its own process with one thread so that it fits one CPU core. Training
and validation losses are read from the runs' log lines and written to `<out>.csv`
(iteration, bf16 train, fp8 train, bf16 val, fp8 val) and plotted to `<out>.png`; a
markdown table of the validation losses and the final relative difference is printed.

The data is GPT-2-tokenized `.bin/.idx` written by `paratron preprocess`;
`--prepare-from DIR` makes it first from DIR's `pretrain/c4_demo.jsonl` (300 web documents)
and `pretrain/wiki_demo.txt` (30 Wikipedia articles, one a line). The articles are cut at
sentence ends into pieces of about 2,000 characters, the size of a C4 document, and the
two are shuffled together, so that the validation split (the last 10 % of documents)
holds the same mixture as the training split.

matplotlib is needed only by this script (`pip install matplotlib`); it is imported inside
`plot` so that the rest of the script, and the project, never depend on it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data
RUNS = {"bf16": ["--bf16"], "fp8": ["--bf16", "--fp8-format", "hybrid"]}

MODEL = ("--num-layers 4 --hidden-size 128 --ffn-hidden-size 384 --num-attention-heads 4 "
         "--seq-length 128 --max-position-embeddings 128 --normalization RMSNorm --swiglu "
         "--position-embedding-type rope --disable-bias-linear "
         "--untie-embeddings-and-output-weights").split()
TRAINING = ("--micro-batch-size 4 --global-batch-size 16 --lr 1e-3 --min-lr 1e-4 "
            "--lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0 "
            "--seed 1234 --split 90,10,0 --eval-interval 25 --eval-iters 18 "
            "--log-interval 10").split()

TRAIN_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: ([0-9.Ee+-]+)")
VAL_LINE = re.compile(r"validation loss at iteration (\d+) .*?\| lm loss value: ([0-9.Ee+-]+)")


def prepare(source: Path, args) -> None:
    """Write the shuffled C4 + Wikipedia documents as JSONL and tokenize them."""
    docs = [json.loads(line)["text"] for line in open(source / "pretrain/c4_demo.jsonl")]
    for article in open(source / "pretrain/wiki_demo.txt"):
        piece = ""
        for sentence in re.split(r"(?<=\. )", article.strip()):
            piece += sentence
            if len(piece) >= 2000:
                docs.append(piece.strip())
                piece = ""
        if piece.strip():
            docs.append(piece.strip())
    random.Random(0).shuffle(docs)
    jsonl = Path(args.data_prefix + ".jsonl")
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    subprocess.run([sys.executable, "-m", "paratron", "preprocess", "--input", str(jsonl),
                    "--output-prefix", args.data_prefix.removesuffix("_text_document"),
                    "--json-keys", "text", "--tokenizer-type", "GPT2BPETokenizer",
                    "--vocab-file", args.vocab_file, "--merge-file", args.merge_file,
                    "--append-eod", "--workers", "1"], check=True)


def train(run: str, args, log: Path) -> str:
    """Run `paratron train` for one precision; return its log text."""
    cmd = [sys.executable, "-m", "paratron", "train", *MODEL, *TRAINING, *RUNS[run],
           "--train-iters", str(args.iters), "--lr-decay-iters", str(args.iters),
           "--lr-warmup-iters", str(max(1, args.iters // 10)),
           "--data-path", args.data_prefix, "--tokenizer-type", "GPT2BPETokenizer",
           "--vocab-file", args.vocab_file, "--merge-file", args.merge_file]
    print(f"{run}: {' '.join(cmd[1:])}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        code = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    text = log.read_text()
    if code:
        last = text.strip().splitlines()[-1] if text.strip() else ""
        sys.exit(f"fp8_convergence: the {run} run exited with {code} ({log}): {last}")
    return text


def losses(text: str, pattern: re.Pattern) -> dict[int, float]:
    """Iteration -> loss of every log line matching `pattern` (a later line wins)."""
    return {int(m[1]): float(m[2]) for m in pattern.finditer(text)}


def write_csv(path: Path, curves: dict[str, dict[int, float]]) -> None:
    iterations = sorted(set().union(*curves.values()))
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["iteration", *curves])
        for it in iterations:
            out.writerow([it, *(f"{c[it]:.6f}" if it in c else "" for c in curves.values())])


def plot(path: Path, curves: dict[str, dict[int, float]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"bf16": "tab:blue", "fp8": "tab:red"}
    for name, curve in curves.items():
        run, kind = name.split()
        xs = sorted(curve)
        ax.plot(xs, [curve[x] for x in xs], color=styles[run],
                linestyle="-" if kind == "val" else ":", marker="o" if kind == "val" else None,
                markersize=3, label=f"{run} {kind}" if run == "bf16" else f"fp8 hybrid {kind}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss")
    ax.set_title("bf16 vs FP8 (hybrid) training of a 4-layer Llama on C4 + Wikipedia")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(bf16: dict[int, float], fp8: dict[int, float]) -> str:
    rows = ["| iteration | bf16 val loss | fp8 hybrid val loss | relative difference |",
            "|---|---|---|---|"]
    for it in sorted(set(bf16) & set(fp8)):
        rows.append(f"| {it} | {bf16[it]:.4f} | {fp8[it]:.4f} | "
                    f"{(fp8[it] - bf16[it]) / bf16[it]:+.2%} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-prefix", default="/tmp/fp8_study/c4_wiki_mixed_text_document",
                   help="prefix of the .bin/.idx written by paratron preprocess")
    p.add_argument("--vocab-file", default=str(SHARED / "gpt2/gpt2-vocab.json"))
    p.add_argument("--merge-file", default=str(SHARED / "gpt2/gpt2-merges.txt"))
    p.add_argument("--out", default="benchmarks/fp8_convergence",
                   help="writes <out>.csv and <out>.png")
    p.add_argument("--log-dir", default="/tmp/fp8_study", help="where the runs' logs go")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--prepare-from", type=Path, metavar="DIR",
                   help="first make the data at --data-prefix from DIR (e.g. ../shared/data)")
    args = p.parse_args()
    if args.iters < 1:
        sys.exit("fp8_convergence: --iters must be positive")
    if not args.data_prefix.endswith("_text_document"):
        sys.exit("fp8_convergence: --data-prefix must end with _text_document")
    if args.prepare_from:
        prepare(args.prepare_from, args)
    needed = [Path(args.data_prefix + ".bin"), Path(args.data_prefix + ".idx"),
              Path(args.vocab_file), Path(args.merge_file)]
    if missing := [str(f) for f in needed if not f.exists()]:
        sys.exit(f"fp8_convergence: missing {', '.join(missing)} (make it with --prepare-from DIR)")

    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    logs = {run: train(run, args, Path(args.log_dir) / f"fp8_convergence_{run}.log")
            for run in RUNS}
    curves = {f"{run} {kind}": losses(logs[run], pattern)
              for kind, pattern in (("train", TRAIN_LINE), ("val", VAL_LINE)) for run in RUNS}
    write_csv(Path(args.out + ".csv"), curves)
    plot(Path(args.out + ".png"), curves)

    bf16, fp8 = curves["bf16 val"], curves["fp8 val"]
    last = max(set(bf16) & set(fp8))
    print(table(bf16, fp8))
    print(f"\nfinal validation loss (iteration {last}): bf16 {bf16[last]:.4f}, "
          f"fp8 hybrid {fp8[last]:.4f}, relative difference "
          f"{(fp8[last] - bf16[last]) / bf16[last]:+.2%}")


if __name__ == "__main__":
    main()
