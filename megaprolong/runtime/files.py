"""Files and folders that readers see whole or not at all.

Both write beside the target and rename over it: a rename within one file system is atomic on POSIX, so a
process that dies half-way leaves the previous version (or nothing), never a part of the new one.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def replace_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically. The temporary name carries the pid, so that processes writing the
    same file (ranks, launches) never write into each other's; the last rename wins."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def out_folder_problem(out: str | None, force: bool) -> str | None:
    """What is wrong with ``--out`` for a command that writes a whole output folder, or None."""
    if not out:
        return "--out is required"
    if os.path.exists(out) and not force:
        return f"--out {out} exists (pass --force to overwrite)"
    return None


@contextmanager
def whole_folder(out: Path, replace: bool) -> Iterator[Path]:
    """Yields ``.OUT.tmp`` (beside ``out``) to fill; when the block ends without an error it becomes ``out``
    (replacing an existing one only if ``replace``), so that an output folder is either all there or not at
    all. On an error the temporary folder goes and ``out`` stays as it was."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists() and replace:
        shutil.rmtree(out)
    tmp.rename(out)
