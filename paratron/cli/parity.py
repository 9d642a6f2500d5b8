"""`paratron parity <train flags> --layouts "tp2 sp" "pp2 vpp2" ... [--steps N]`."""

from __future__ import annotations

import argparse
import sys

from paratron.checkpoint.files import CheckpointError
from paratron.data.errors import DataError
from paratron.options import ConfigError

USAGE = ("paratron parity <paratron train flags> --layouts LAYOUT [LAYOUT ...] [--steps N] "
         "[--tolerance T]")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="paratron parity", usage=USAGE, allow_abbrev=False, description=(
        "Train a few iterations on each parallel layout and on one process, from the same "
        "weights (or --load) and batches, and name the first module whose output, input "
        "gradient, parameter gradient or updated weight differs. Layout tokens: tpN, ppN, "
        "vppN, cpN, epN, etpN, dpN, sp, distopt, overlap."))
    parser.add_argument("--layouts", nargs="+", required=True, metavar="LAYOUT",
                        help='layouts to check, each one quoted string, e.g. "tp2 sp"')
    parser.add_argument("--steps", type=int, default=2, metavar="N",
                        help="iterations to compare (default 2)")
    parser.add_argument("--tolerance", type=float, default=None, metavar="T",
                        help="largest relative difference taken as equal (default by "
                             "precision: fp64 1e-10, fp32 5e-5, bf16 2e-2, fp16 5e-3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from paratron.debug.parity import check_parity
    from paratron.debug.workers import ParityError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        _parser().print_help()
        return 0
    try:
        args, train_flags = _parser().parse_known_args(argv)
        if args.steps < 1:
            raise ConfigError(f"--steps {args.steps}: give at least 1")
        if args.tolerance is not None and not args.tolerance >= 0:
            raise ConfigError(f"--tolerance {args.tolerance}: give a number >= 0")
        reports = check_parity(train_flags, args.layouts, args.steps, args.tolerance)
    except (ConfigError, DataError, CheckpointError, ParityError) as exc:
        sys.stderr.write(f"paratron parity: error: {exc}\n")
        return 2
    except KeyboardInterrupt:  # the layouts' processes are stopped on the way out
        sys.stderr.write("paratron parity: interrupted\n")
        return 130
    return 0 if all(report.first is None for report in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
