"""`paratron train <Megatron-LM flags>`."""

from __future__ import annotations

import sys

from paratron.config import ConfigError, parse_args
from paratron.data.errors import DataError
from paratron.parallel.launch import PeerFailure


def main(argv: list[str] | None = None) -> int:
    from paratron.training.faults import NonFiniteError
    from paratron.training.pretrain import pretrain

    try:
        cfg = parse_args(argv)
        pretrain(cfg)
    except (ConfigError, DataError) as exc:
        sys.stderr.write(f"paratron train: error: {exc}\n")
        return 2
    except (PeerFailure, NonFiniteError) as exc:
        sys.stderr.write(f"paratron train: error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
