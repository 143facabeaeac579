"""The output directory: checked before anything is written, never silently reused.

:func:`check` runs before set-up and writes nothing: the directory must be a directory (or not exist
yet, under a writable parent), writable, and empty unless the run resumes it (``resume``) or replaces
it (``overwrite``). :func:`claim` runs once set-up has succeeded: it creates the directory and, for
``overwrite``, removes the artefacts an earlier run left (only the names a run writes; other files
stay).
"""
from __future__ import annotations

import glob
import os
import shutil
from typing import List

# what a run writes (see debora.train.run); ``overwrite`` removes exactly these
ARTEFACTS = ("config.json", "labels.json", "metrics.jsonl", "metrics.jsonl.tmp", "summary.md", "summary.json",
             "checkpoint", "checkpoint.old", "adapter", "peft", "ranks.png", "s_trajectories.png",
             "fw_gap.png", "curves.png")


def _nearest_existing(path: str) -> str:
    p = path
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def check(out: str, *, resume: bool, overwrite: bool, no_checkpoint: bool = False) -> None:
    """Refuse (``ValueError``) an output directory that is a file, not writable, or holds an earlier
    run while neither ``resume`` nor ``overwrite`` is set (``no_checkpoint``: ``--resume auto`` found
    no checkpoint to continue, so the directory is treated as for a new run). Writes nothing."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"output_dir {out!r} is a file, not a directory; choose another --output-dir")
    base = _nearest_existing(out)
    if not os.path.isdir(base):
        raise ValueError(f"output_dir {out!r} cannot be created: {base!r} is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir {out!r} is not writable ({base!r} denies write access); choose "
                         "another --output-dir or fix its permissions")
    if os.path.isdir(out) and (not resume or no_checkpoint) and not overwrite:
        entries = sorted(os.listdir(out))
        if entries:
            shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
            if no_checkpoint:
                raise ValueError(f"--resume auto: output_dir {out!r} has no checkpoint to continue but is "
                                 f"not empty ({shown}); pass --overwrite to start over in it, or choose "
                                 "another --output-dir")
            raise ValueError(f"output_dir {out!r} is not empty ({shown}); pass --resume auto to continue "
                             "the run in it, --overwrite to replace it, or choose another --output-dir")


def claim(out: str, *, overwrite: bool) -> List[str]:
    """Create ``out``; with ``overwrite``, remove an earlier run's artefacts. Returns what was removed."""
    os.makedirs(out, exist_ok=True)
    removed = []
    if overwrite:
        names = list(ARTEFACTS) + [os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(out),
                                                                                      "checkpoint.tmp-*"))]
        for name in names:
            p = os.path.join(out, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
                removed.append(name)
            elif os.path.lexists(p):
                os.remove(p)
                removed.append(name)
    return removed
