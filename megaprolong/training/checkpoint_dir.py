"""A run's checkpoint folder: which checkpoints are complete, which verify, which were set aside.

Plain file inspection (no torch, no megatron-core), so that the start-up checks run before any process
group and the batch shell's check starts in a fraction of a second. The collective parts (every rank
verifying its own files) are in :mod:`megaprolong.training.checkpoint`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from megaprolong.runtime import attempts
from megaprolong.training import manifest

STEP_DIR = re.compile(r"^step_(\d{8})$")
ASIDE = ".corrupt"  # step_N.corrupt: failed verification, renamed aside
META = "megaprolong.json"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (a dir counts once its metadata is in place)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / META).exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def set_aside(root: str | Path) -> list[Path]:
    """Checkpoints renamed aside after failing verification."""
    root = Path(root)
    return sorted(p for p in root.glob(f"step_*{ASIDE}*") if p.is_dir()) if root.is_dir() else []


def verify(path: str | Path, checksums: bool = True, mine=None) -> list[str]:
    """Problems of the checkpoint at ``path`` (unreadable metadata, no file list, a file missing,
    truncated or changed since it was saved), one line each; empty when it verifies. ``checksums=False``:
    presence and sizes only (stat calls); ``mine``: which entries this process checks (see
    :func:`manifest.owned_by`)."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        return [f"{path / META}: unreadable ({e})"]
    if not meta.get("files"):
        return [f"{path / META}: no file list (not written by a complete save): cannot be verified"]
    return manifest.problems(path, meta["files"], checksums, mine)


def resume_problems(root: str | Path | None) -> list[str]:
    """Before any process group: when ``root`` holds checkpoints (or its progress record says one was
    published) but none has all its files at their recorded sizes, why the run must not start (one line
    per checkpoint); empty otherwise. Contents are verified later, in parallel (:func:`choose_resume`)."""
    if not root:
        return []
    found = complete_checkpoints(root)
    lines = []
    for path in reversed(found):
        problems = verify(path, checksums=False)
        if not problems:
            return []
        lines.append(f"{path}: {problems[0]}" if not problems[0].startswith(str(path)) else problems[0])
    return no_checkpoint_verifies(root, found, lines)


def no_checkpoint_verifies(root, found: list[Path], lines: list[str]) -> list[str]:
    aside = set_aside(root)
    published = int(attempts.read(root).get("checkpoint") or 0)
    if not found and not aside and not published:
        return []  # nothing was ever saved here: the stage starts from its beginning
    lines += [f"{p}: set aside earlier (failed verification)" for p in aside]
    if not lines:
        lines.append(f"{root}: its progress record says step {published} was checkpointed, but no checkpoint is there")
    return [f"checkpoint.dir={root}: no checkpoint verifies; not starting the stage again from its beginning "
            f"(it would restart the LR schedule, and rotation would delete the old checkpoints). Repair or restore "
            f"a checkpoint (or move the folder away to really start over):", *lines]


def remove_stale_saves(root: str | Path | None, say) -> None:
    """``step_N.tmp`` folders left by a save that was killed (rank 0, at start, under the run's lock)."""
    if not root or not Path(root).is_dir():
        return
    for tmp in Path(root).glob("step_*.tmp"):
        say(f"removing {tmp}: left by an interrupted save")
        shutil.rmtree(tmp, ignore_errors=True)


def rotate(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints whose files are all there at their recorded sizes; a damaged
    one is neither counted nor deleted (resume sets it aside, a person looks at it)."""
    intact = [p for p in complete_checkpoints(root) if not verify(p, checksums=False)]
    for old in intact[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
