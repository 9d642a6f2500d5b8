"""Drop-in for Megatron-LM's pretrain_gpt.py.

An existing `torchrun ... pretrain_gpt.py <Megatron flags>` script runs Paratron
when pointed at this file; it is the same as `paratron train <flags>`.
"""

import sys

from paratron.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
