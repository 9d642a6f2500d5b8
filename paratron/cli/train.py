"""`paratron train <Megatron-LM flags>`."""

from __future__ import annotations

import sys

from paratron.checkpoint.files import CheckpointError
from paratron.cli.args import parse_args
from paratron.data.errors import DataError
from paratron.options import ConfigError
from paratron.parallel.launch import PeerFailure, launcher_rank, record_for_launcher


def main(argv: list[str] | None = None) -> int:
    from paratron.training.faults import NonFiniteError
    from paratron.training.pretrain import pretrain

    try:
        cfg = parse_args(argv)
    except (ConfigError, DataError) as exc:
        # Every rank of a launch refuses the same flags alike, before any process group
        # exists: rank 0 says it, the others only hand it to the launcher.
        return _fail(exc, 2, speak=launcher_rank() == 0)
    try:
        pretrain(cfg)
    except (ConfigError, DataError) as exc:
        return _fail(exc, 2)
    except (PeerFailure, NonFiniteError, CheckpointError) as exc:
        return _fail(exc, 1)
    except KeyboardInterrupt:  # Ctrl-C without --exit-signal-handler, one process
        return _fail("interrupted (SIGINT) before the next checkpoint; --exit-signal-handler "
                     "saves on Ctrl-C", 130)
    return 0


def _fail(exc: Exception | str, code: int, speak: bool = True) -> int:
    """One line on stderr (unless `speak` is False), also handed to torchrun for its
    failure summary."""
    line = f"paratron train: error: {exc}"
    if speak:
        sys.stderr.write(line + "\n")
    record_for_launcher(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
