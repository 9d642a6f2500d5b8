"""`paratron <command> ...`: dispatch to the command modules.

Every command reports a refused input as one line on stderr and a non-zero exit code,
never a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

# torch's C++ side logs a warning for every store call that a dead peer leaves unanswered;
# Paratron names the peer in one line, so only torch's errors are shown (set before torch
# is imported; a user's own setting wins).
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

COMMANDS = {
    "train": ("paratron.cli.train", "train a model (Megatron-LM flags)"),
    "preprocess": ("paratron.cli.preprocess", "tokenize JSONL/text into .bin/.idx files"),
    "inspect-data": ("paratron.cli.inspect_data", "print the token ids of training samples"),
    "convert": ("paratron.cli.convert", "convert checkpoints: Hugging Face / Megatron-LM <-> Paratron"),
    "generate": ("paratron.cli.generate", "generate text from a checkpoint or a Hugging Face folder"),
    "plan": ("paratron.cli.plan", "per-GPU memory of parallel layouts, and a recommendation"),
    "demo": ("paratron.cli.demo", "train a small model on text every machine has"),
    "parity": ("paratron.cli.parity", "compare layouts with one process, module by module"),
    "replay": ("paratron.cli.replay", "re-run one saved iteration on the CPU, watching every op"),
}


def _usage() -> str:
    rows = "\n".join(f"  {name:<14}{desc}" for name, (_, desc) in COMMANDS.items())
    return f"usage: paratron <command> [flags]\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        sys.stderr.write(f"paratron: error: unknown command '{name}'{hint}\n")
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
