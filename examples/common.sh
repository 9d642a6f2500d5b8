# Sourced by the example scripts: paths, the interpreter, a one-line error and the
# sample input.
#   EXAMPLE (set before sourcing) names the script in error messages.
HERE="$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)"
ROOT="$(dirname "$(dirname "$HERE")")"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
SIZE="${SIZE:-tiny}"

fail() { echo "$EXAMPLE: error: $*" >&2; exit 2; }
case "$SIZE" in tiny|full) ;; *) fail "SIZE=$SIZE: use tiny (CPU) or full (GPUs)" ;; esac

# sample_data FOLDER [--gpt2-bpe [CORPUS]]: the sample inputs the examples use when the
# user names none (examples/sample_data.py: a corpus and Alpaca-format instructions from
# the Python standard library's docstrings), made once in FOLDER.
sample_data() {
    local folder=$1; shift
    "$PYTHON" "$ROOT/examples/sample_data.py" --out "$folder" "$@" || exit 2
}

# check_given NAME...: each of these variables the user set names an existing file, or
# one line naming the variable (checked before any sample is made, so a refusal leaves
# nothing behind).
check_given() {
    local name
    for name in "$@"; do
        [ -z "${!name:-}" ] || [ -f "${!name}" ] \
            || fail "$name=${!name} not found; set $name to your file, or unset it to use the sample"
    done
}
