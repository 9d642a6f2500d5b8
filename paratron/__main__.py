"""`python -m paratron <command>`; `torchrun ... -m paratron train ...` works the same."""

import sys

from paratron.cli.main import main

sys.exit(main())
