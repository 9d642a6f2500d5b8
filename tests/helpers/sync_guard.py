"""Record every call in Paratron that would make the host wait for a CUDA stream.

    with HostSyncGuard() as guard:
        guard.mark(trainer.stage, "forward_backward", "micro-batches")
        trainer.train_step()
    inside = in_phase(guard.records, "micro-batches")
    assert not inside, report(inside)

On a GPU a host sync (reading a device value, a blocking host-to-device copy, a
`nonzero` whose output size depends on the data) stalls the CPU until the queued
kernels finish, so the GPU idles while the next kernels are launched. The test machine
has no GPU: every tensor is a CPU tensor, so the guard treats any tensor as a device
tensor and records each call that would sync on CUDA. Only calls made from Paratron's
own code count: the first frame outside torch (torch's Python wrappers, such as
`Tensor.__format__` calling `item`, speak for their caller) must lie in `paratron/`;
the DataLoader's and torch optimizers' work on host tensors does not count.

`mark(owner, name, phase)` wraps a method (or a module-level function) so that each
record says which phases were open (`record.phases`) and how many times each phase had
been entered (`record.entries`), which is how a test says "none inside micro-batches,
at most one per iteration".
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections import Counter
from dataclasses import dataclass

import torch

import paratron

PARATRON = os.path.dirname(os.path.abspath(paratron.__file__)) + os.sep
TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
# torch code that works on host tensors by design: the DataLoader's, and the step counts
# that torch's optimizers keep on the CPU unless fused or capturable.
HOST_SIDE = tuple(TORCH + os.path.join(*parts) + os.sep
                  for parts in (("utils", "data"), ("optim",)))
_INHERITED = object()  # the attribute came from a class: restoring deletes ours


def _always(*args, **kwargs) -> bool:
    return True


def _without_output_size(*args, **kwargs) -> bool:
    """`repeat_interleave` with tensor repeats and no `output_size` reads the total."""
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if args else None)
    output_size = args[3] if len(args) > 3 else kwargs.get("output_size")
    return isinstance(repeats, torch.Tensor) and output_size is None


def _from_host_data(data=None, *args, **kwargs) -> bool:
    """`torch.tensor`/`as_tensor` of Python or NumPy data straight onto a device."""
    return kwargs.get("device") is not None and not isinstance(data, torch.Tensor)


def _blocking_copy(tensor, *args, **kwargs) -> bool:
    """`.to(device)` without `non_blocking=True` (a blocking copy); `.to(dtype)` alone
    stays on the tensor's device and is not one."""
    targets = [kwargs.get("device")] + [a for a in args if isinstance(a, (str, torch.device,
                                                                         torch.Tensor))]
    non_blocking = kwargs.get("non_blocking", any(a is True for a in args))
    return any(t is not None for t in targets) and not non_blocking


# (owner, attribute, when the call syncs): every callable the guard patches.
SYNC_POINTS = [
    *[(torch.Tensor, name, _always) for name in (
        "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy",
        "nonzero")],
    (torch, "nonzero", _always),
    (torch, "repeat_interleave", _without_output_size),
    (torch.Tensor, "repeat_interleave", _without_output_size),
    (torch, "tensor", _from_host_data),
    (torch, "as_tensor", _from_host_data),
    (torch.Tensor, "to", _blocking_copy),
    (torch.Tensor, "cuda", lambda *args, **kwargs: not kwargs.get("non_blocking")),
    *[(owner, "synchronize", _always) for owner in (torch.cuda, torch.cuda.Stream,
                                                      torch.cuda.Event)],
]


@dataclass
class SyncRecord:
    what: str  # the synchronising call, e.g. "Tensor.item"
    where: str  # the innermost Paratron frame, "paratron/model/moe.py:418"
    stack: tuple[str, ...]  # Paratron frames, innermost first
    phases: tuple[str, ...]  # the phases open at the call, outermost first
    entries: dict[str, int]  # how many times each phase had been entered

    def __str__(self) -> str:
        inside = "/".join(self.phases) or "-"
        return f"{self.what} at {' <- '.join(self.stack)} [{inside}]"


def _paratron_stack(frame) -> tuple[str, ...]:
    """The Paratron frames of the stack (innermost first), or () when the call was not
    made by Paratron: the first frame outside torch decides (work of `HOST_SIDE` on host
    tensors is no sync)."""
    while frame is not None and frame.f_code.co_filename.startswith(TORCH):
        if frame.f_code.co_filename.startswith(HOST_SIDE):
            return ()
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(PARATRON):
        return ()
    stack = []
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(PARATRON):
            relative = os.path.relpath(filename, os.path.dirname(PARATRON.rstrip(os.sep)))
            stack.append(f"{relative}:{frame.f_lineno}")
        frame = frame.f_back
    return tuple(stack[:4])


class HostSyncGuard:
    """Patch the synchronising calls of `SYNC_POINTS` while the `with` block runs."""

    def __init__(self):
        self.records: list[SyncRecord] = []
        self.open_phases: list[str] = []
        self.entries: Counter[str] = Counter()
        self._restore: list[tuple[object, str, object]] = []

    # ------------------------------------------------------------ patching
    def _patch(self, owner, name: str, replacement) -> None:
        """Set `owner.name` (a class, module or instance) until the guard exits."""
        self._restore.append((owner, name, vars(owner).get(name, _INHERITED)))
        setattr(owner, name, replacement)

    def _recording(self, owner, name: str, syncs):
        original = getattr(owner, name)
        what = f"{getattr(owner, '__name__', owner)}.{name}"

        @functools.wraps(original)
        def recorded(*args, **kwargs):
            if syncs(*args, **kwargs):
                stack = _paratron_stack(sys._getframe(1))
                if stack:
                    self.records.append(SyncRecord(what, stack[0], stack,
                                                   tuple(self.open_phases),
                                                   dict(self.entries)))
            return original(*args, **kwargs)
        return recorded

    def __enter__(self) -> HostSyncGuard:
        try:
            for owner, name, syncs in SYNC_POINTS:
                self._patch(owner, name, self._recording(owner, name, syncs))
        except BaseException:
            self._unpatch()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._unpatch()

    def _unpatch(self) -> None:
        while self._restore:
            owner, name, original = self._restore.pop()
            if original is _INHERITED:
                delattr(owner, name)
            else:
                setattr(owner, name, original)

    # ------------------------------------------------------------ phases
    @contextlib.contextmanager
    def phase(self, name: str):
        """Records made inside the block carry `name` among their phases."""
        self.entries[name] += 1
        self.open_phases.append(name)
        try:
            yield
        finally:
            self.open_phases.pop()

    def mark(self, owner, attribute: str, phase: str) -> None:
        """Run every call of `owner.attribute` inside `phase` (undone on exit)."""
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def marked(*args, **kwargs):
            with self.phase(phase):
                return original(*args, **kwargs)
        self._patch(owner, attribute, marked)


# ---------------------------------------------------------------- queries over records
def in_phase(records: list[SyncRecord], phase: str) -> list[SyncRecord]:
    return [r for r in records if phase in r.phases]


def outside_phase(records: list[SyncRecord], phase: str) -> list[SyncRecord]:
    return [r for r in records if phase not in r.phases]


def per_entry(records: list[SyncRecord], phase: str) -> Counter[int]:
    """How many records fell into each entry of `phase` (numbered from 1; 0 before the
    first), counting those made after it was left until it is entered again."""
    return Counter(r.entries.get(phase, 0) for r in records)


def report(records: list[SyncRecord]) -> str:
    """One line per distinct call site and phases, most frequent first."""
    counts = Counter(str(r) for r in records)
    return "\n".join(f"{n} x {line}" for line, n in counts.most_common())
