"""One rank's random-number states as safetensors tensors plus a JSON header.

Python's `random`, NumPy's global generator, torch's CPU generator, the accelerator's
default generator (when one is in use) and the TP tracker's streams (`pg.rng`). They
are per rank and depend on the rank's place in the grid, so they are restored only into
the same layout.
"""

from __future__ import annotations

import json
import random

import numpy as np
import torch


def capture(pg, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON-able header) of this rank's RNG states."""
    device = torch.device(device)
    version, py_state, gauss = random.getstate()
    kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(),
               "python": torch.tensor(py_state, dtype=torch.int64),
               "numpy": torch.from_numpy(np_keys.astype(np.int64))}
    header = {"python": [version, gauss], "numpy": [kind, int(np_pos), int(np_has_gauss),
                                                    float(np_gauss)],
              "device": None, "tracker": {}}
    if device.type != "cpu":
        header["device"] = str(device)
        tensors["device"] = torch.get_device_module(device).get_rng_state(device).cpu()
    for name, (dev, state) in pg.rng.get_states().items():
        header["tracker"][name] = str(dev)
        tensors[f"tracker/{name}"] = state.cpu()
    return tensors, {"rng": json.dumps(header)}


def header_problem(header: dict[str, tuple[str, list[int]]]) -> str | None:
    """What is wrong with the tensors an RNG file declares ({name: (dtype, shape)}),
    checked before anything is restored; None when they are what `capture` writes."""
    want = {"torch_cpu": ("uint8", [torch.get_rng_state().numel()]),
            "python": ("int64", [625]), "numpy": ("int64", [624])}
    for name, expected in want.items():
        if header.get(name) != expected:
            return f"RNG state {name} is {header.get(name)}, expected {expected}"
    for name, (dtype, shape) in header.items():
        if name not in want and (dtype != "uint8" or len(shape) != 1):
            return f"RNG state {name} is {dtype} {shape}, expected a uint8 vector"
    return None


def restore(pg, tensors: dict[str, torch.Tensor], header: dict, where: str = "") -> None:
    """Put back states written by `capture` on the same rank of the same layout; a
    ValueError naming `where` when they are not such states."""
    try:
        _restore(pg, tensors, header)
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise ValueError(f"{where}: the RNG states cannot be restored ({error!r}); "
                         f"resume with --no-load-rng") from None


def _restore(pg, tensors: dict[str, torch.Tensor], header: dict) -> None:
    h = json.loads(header["rng"])
    version, gauss = h["python"]
    random.setstate((version, tuple(int(x) for x in tensors["python"].tolist()), gauss))
    kind, pos, has_gauss, cached = h["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss,
                         cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if h["device"] is not None:
        device = torch.device(h["device"])
        torch.get_device_module(device).set_rng_state(tensors["device"], device)
    pg.rng.set_states({name: (torch.device(dev), tensors[f"tracker/{name}"])
                       for name, dev in h["tracker"].items()})
