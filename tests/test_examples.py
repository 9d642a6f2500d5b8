"""The runnable examples under examples/ run end to end at their smallest size.

Each test runs an example the way its README section says (a subprocess on the CPU,
gloo between processes), only smaller, and checks what the example promises: files
written, a loss that is finite and goes down, a launcher that builds the same
arguments as the users' script. Tests that read ../shared/data skip when it is absent.
"""

from __future__ import annotations

import pytest

from paratron.parallel.launch import CUDA_CONNECTIONS, set_cuda_device_max_connections


# --------------------------------------------------------------- CUDA_DEVICE_MAX_CONNECTIONS
@pytest.mark.parametrize("tp,cp,before,after,warns", [
    (1, 1, None, None, False),   # nothing to overlap: left alone
    (2, 1, None, "1", False),    # TP: set before the GPU is touched
    (1, 2, None, "1", False),    # CP likewise
    (2, 1, "1", "1", False),     # already right
    (2, 2, "8", "8", True),      # the user's value is kept, with a warning
])
def test_cuda_device_max_connections(tp, cp, before, after, warns):
    env = {} if before is None else {CUDA_CONNECTIONS: before}
    warning = set_cuda_device_max_connections(tp, cp, env)
    assert env.get(CUDA_CONNECTIONS) == after
    assert (warning is not None) == warns
    if warns:
        assert "\n" not in warning and f"{CUDA_CONNECTIONS}=1" in warning


def test_cuda_device_max_connections_too_late():
    env = {}
    warning = set_cuda_device_max_connections(2, 1, env, cuda_initialized=True)
    assert CUDA_CONNECTIONS not in env and "already initialised" in warning
