# Sourced by the example scripts: paths, the interpreter and a one-line error.
#   EXAMPLE (set before sourcing) names the script in error messages.
HERE="$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)"
ROOT="$(dirname "$(dirname "$HERE")")"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
DATA="${DATA:-$ROOT/../shared/data}"
SIZE="${SIZE:-tiny}"

fail() { echo "$EXAMPLE: error: $*" >&2; exit 2; }
