"""Writing files so that a crash or a kill never leaves a half-written one where a reader looks: everything is
written to a temporary file in the target's folder and renamed into place (``os.replace`` is atomic on POSIX)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(target: str) -> Iterator[str]:
    """A temporary path beside ``target`` to write to; renamed onto ``target`` only if the block succeeds."""
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    suffix = "".join(os.path.basename(target).partition(".")[1:]) or ".tmp"  # keep the suffix: writers pick formats by it
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_torch_save(obj: Any, target: str) -> str:
    """``torch.save`` that never leaves a partial checkpoint at ``target``."""
    import torch

    with atomic_path(target) as tmp:
        torch.save(obj, tmp)
    return target


def atomic_json(obj: Any, target: str, **dump_kwargs) -> str:
    with atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, **dump_kwargs)
    return target
