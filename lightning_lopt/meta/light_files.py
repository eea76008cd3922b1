"""The files of a light checkpoint: written atomically, with one step and a digest across them.

A light checkpoint directory holds ``model.safetensors`` + ``card.json`` (θ, loadable with
``from_pretrained``) and ``meta_state.safetensors`` + ``meta_state.json`` (the meta-optimizer state
and the step). ``meta_state.json`` records the step and the SHA-256 of the three other files, so a
directory assembled from different saves (say a later ``model.safetensors`` copied over an earlier
checkpoint) is refused, naming the files, instead of resuming θ of one step with the optimizer
state of another.

Writing goes to a temporary sibling directory that replaces the old one by renames, so an
interrupted save leaves the previous checkpoint whole.

Example::

    write_atomically("runs/x/light", lambda tmp: save_everything_into(tmp))
    meta = read_json(Path("runs/x/light") / "meta_state.json")
    check_consistent(Path("runs/x/light"), meta)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

WEIGHTS = "model.safetensors"
CARD = "card.json"
STATE_TENSORS = "meta_state.safetensors"
STATE_JSON = "meta_state.json"
#: The files ``meta_state.json`` vouches for (it cannot hold its own digest).
DIGESTED = (WEIGHTS, CARD, STATE_TENSORS)


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digest(directory: Path) -> dict[str, str]:
    """``{file: sha256}`` of the files ``meta_state.json`` vouches for."""
    return {name: sha256(directory / name) for name in DIGESTED}


def write_atomically(directory: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh temporary sibling directory, then put it in ``directory``'s place.

    The old directory is renamed aside before the new one is renamed in and deleted after, so at
    every moment one complete checkpoint exists; if ``write`` fails, ``directory`` is untouched.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def read_json(path: Path, fix: str) -> dict[str, Any]:
    """Parse a JSON file, naming the file, the position and ``fix`` when it is malformed."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); {fix}") from err


def check_consistent(directory: Path, meta: dict[str, Any]) -> None:
    """Refuse a light checkpoint whose files come from different saves, naming them.

    With a digest (written since format 2): every vouched-for file must be present and match it.
    Without one (format 1, e.g. older committed checkpoints): the step in ``card.json``
    (``meta_training_steps``) must equal the step in ``meta_state.json``.
    """
    missing = [name for name in DIGESTED if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"resume_from {directory}: missing {', '.join(missing)}; a light checkpoint needs "
            f"{', '.join((*DIGESTED, STATE_JSON))} from one save"
        )
    step = meta.get("meta_step")
    recorded = meta.get("digest")
    if recorded is not None:
        differ = [name for name in DIGESTED if sha256(directory / name) != recorded.get(name)]
        if differ:
            raise ValueError(
                f"resume_from {directory}: {', '.join(differ)} do not match the digest in {STATE_JSON} "
                f"(step {step}): the directory mixes files of different saves or a file was changed; "
                "copy all four files of one save together, or resume from a full checkpoint"
            )
        return
    card = read_json(directory / CARD, "restore the file from the same save")
    card_step = card.get("meta_training_steps")
    if card_step != step:
        raise ValueError(
            f"resume_from {directory}: {CARD} says step {card_step} but {STATE_JSON} says step {step}: "
            "the directory mixes files of different saves; copy all four files of one save together"
        )
