"""Model folders of the real-model demo: complete or not, written atomically, and its one error type."""

from __future__ import annotations

import shutil
from pathlib import Path


class RealModelError(RuntimeError):
    """A failure to fetch or convert the real model; its message is the one line shown to the user."""


def is_complete(folder: Path) -> bool:
    """A checkpoint folder written to the end (the rename is the last step, so existence suffices)."""
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def publish(folder: Path, model, tokenizer, extra: dict[str, str] | None = None) -> None:
    """``save_pretrained`` of model and tokenizer (and ``extra`` text files) under a temporary
    name, then renamed to ``folder``: a killed run never leaves a folder that looks complete."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
