"""Which files a block of code opens, writes, renames or removes, through Python's audit
events (`sys.addaudithook`), so a test can show that a hostile folder made Paratron
touch nothing outside it."""

import os
import sys


class FileAudit:
    """`with audit:` records the real paths read (`reads`) and written, renamed or
    removed (`writes`) inside the block. Audit hooks cannot be removed, so make one per
    test module and reuse it."""

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    CHANGES = ("os.rename", "os.replace", "os.remove", "os.rmdir", "os.mkdir", "os.symlink",
               "os.truncate", "shutil.rmtree", "shutil.copyfile")

    def __init__(self):
        self.active, self.reads, self.writes = False, [], []
        sys.addaudithook(self._hook)

    def __enter__(self) -> "FileAudit":
        self.reads, self.writes, self.active = [], [], True
        return self

    def __exit__(self, *exc) -> None:
        self.active = False

    @property
    def paths(self) -> list[str]:
        return self.reads + self.writes

    def _hook(self, event, args):
        if not self.active:
            return
        if event in ("open", "os.open") and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = (args[1] or "r", args[2]) if event == "open" else ("", args[2])
            writes = any(c in str(mode) for c in "wax+") or (flags or 0) & self.WRITE_FLAGS
            (self.writes if writes else self.reads).append(os.path.realpath(args[0]))
        elif event in self.CHANGES:
            self.writes += [os.path.realpath(a) for a in args[:2]
                            if isinstance(a, (str, bytes, os.PathLike))]
