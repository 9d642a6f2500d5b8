"""`python -m paratron.train <Megatron flags>`: the same as `paratron train`."""

import sys

from paratron.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
