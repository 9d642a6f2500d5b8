"""Test setup: make the tests folder importable (seed argument lists, shared helpers)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
