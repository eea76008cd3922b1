"""Light checkpoints of meta-training: θ as a weights directory plus the meta-optimizer state.

A light checkpoint directory holds ``model.safetensors`` + ``card.json`` (θ in the weights format of
:mod:`lightning_lopt.optim.pretrained`, loadable with ``from_pretrained``) and
``meta_state.safetensors`` + ``meta_state.json`` (the meta-optimizer state and the step). A few
hundred KB; safe to commit. ``meta_state.json`` records the step and the SHA-256 of the three other
files, so a directory assembled from different saves (say a later ``model.safetensors`` copied over
an earlier checkpoint) is refused, naming the files, instead of resuming θ of one step with the
optimizer state of another. Directories written before the digest (format 1) are checked by their
step instead.

A full checkpoint (Lightning's) may continue only the run that wrote it: :func:`check_same_run`.

Writing goes to a temporary sibling directory that replaces the old one by renames, so an
interrupted save leaves the previous checkpoint whole.

Example::

    write_light_checkpoint("runs/x/light", meta.save_pretrained, optimizer.state_dict(), meta_step=50,
                           compute_seconds=12.0, seed=0, trainable_names=names)
    state = read_light_checkpoint("runs/x/light", load_theta=meta_trainer_load_theta)
    state["meta_step"], state["optimizer"]          # 50, a torch.optim state dict
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

WEIGHTS = "model.safetensors"
CARD = "card.json"
META_STATE_TENSORS = "meta_state.safetensors"
META_STATE_JSON = "meta_state.json"
LIGHT_FORMAT_VERSION = 2  # 2: meta_state.json records a digest of the other files
#: The files ``meta_state.json`` vouches for (it cannot hold its own digest).
DIGESTED = (WEIGHTS, CARD, META_STATE_TENSORS)


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
            f"{', '.join((*DIGESTED, META_STATE_JSON))} from one save"
        )
    step = meta.get("meta_step")
    recorded = meta.get("digest")
    if recorded is not None:
        differ = [name for name in DIGESTED if sha256(directory / name) != recorded.get(name)]
        if differ:
            raise ValueError(
                f"resume_from {directory}: {', '.join(differ)} do not match the digest in {META_STATE_JSON} "
                f"(step {step}): the directory mixes files of different saves or a file was changed; "
                "copy all four files of one save together, or resume from a full checkpoint"
            )
        return
    card = read_json(directory / CARD, "restore the file from the same save")
    card_step = card.get("meta_training_steps")
    if card_step != step:
        raise ValueError(
            f"resume_from {directory}: {CARD} says step {card_step} but {META_STATE_JSON} says step {step}: "
            "the directory mixes files of different saves; copy all four files of one save together"
        )


def write_light_checkpoint(
    directory: str | Path,
    save_weights: Callable[[Path], Any],
    optimizer_state: dict[str, Any],
    *,
    meta_step: int,
    compute_seconds: float,
    seed: int,
    trainable_names: Sequence[str],
) -> Path:
    """Write a light checkpoint atomically: ``save_weights(dir)`` writes θ, this writes the rest.

    ``optimizer_state`` is the meta-optimizer's ``state_dict()``: its tensors go to
    ``meta_state.safetensors``, its other entries, the step and the digest to ``meta_state.json``.
    """
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in optimizer_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value

    def write(tmp: Path) -> None:
        save_weights(tmp)
        safetensors.torch.save_file(tensors, str(tmp / META_STATE_TENSORS))
        meta = {
            "format_version": LIGHT_FORMAT_VERSION,
            "meta_step": meta_step,
            "digest": digest(tmp),
            "compute_seconds": compute_seconds,
            "seed": seed,
            "param_groups": optimizer_state["param_groups"],
            "scalars": scalars,
            "trainable_names": list(trainable_names),
        }
        (tmp / META_STATE_JSON).write_text(json.dumps(meta, indent=2) + "\n")

    return write_atomically(directory, write)


def read_light_checkpoint(directory: str | Path, load_theta: Callable[[Path], object]) -> dict[str, Any]:
    """Check a light checkpoint, hand its directory to ``load_theta`` and read the rest.

    Returns ``{"optimizer": state_dict, "meta_step", "compute_seconds", "warm_start_report",
    "started_from"}`` (the report only when the card holds a finished warm start, else ``None``;
    ``started_from`` as the card has it, ``None`` on cards written before it was recorded).
    """
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from {path}: no such directory (relative paths start at {Path.cwd()})")
    if not (path / META_STATE_JSON).is_file():
        raise FileNotFoundError(
            f"resume_from {path}: no {META_STATE_JSON}; is it a light checkpoint? (weights only: use init_from)"
        )
    meta = read_json(path / META_STATE_JSON, "restore the directory from one save")
    check_consistent(path, meta)
    load_theta(path)
    card = read_json(path / CARD, "restore the directory from one save")
    report = (card.get("recipe") or {}).get("warm_start")
    try:
        tensors = safetensors.torch.load_file(str(path / META_STATE_TENSORS))
    except (safetensors.SafetensorError, OSError) as err:
        raise ValueError(
            f"resume_from {path}: {META_STATE_TENSORS} is truncated or corrupt ({err}); restore the "
            "directory from one save, resume from a full checkpoint (--ckpt_path), or start from its "
            "weights only with init_from"
        ) from err
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {
        "optimizer": {"state": state, "param_groups": meta["param_groups"]},
        "meta_step": int(meta["meta_step"]),
        "compute_seconds": float(meta.get("compute_seconds", 0.0)),
        "warm_start_report": report if report and "relative_error_end" in report else None,
        "started_from": card.get("started_from"),
    }


#: Recipe entries that define what a full checkpoint's state means: a checkpoint whose entries differ
#: cannot continue this run. The others (schedule, update clip, name) may change on purpose; a
#: difference is reported, since it makes the continuation differ from an uninterrupted run.
_SAME_RUN_KEYS = (
    "lopt", "mu", "base_width", "hidden_norm", "stage", "tasks", "estimator", "meta_objective", "truncation",
    "initial_offset",
    "augmentation", "seed",
)
#: What a checkpoint written before an entry existed ran with.
_ABSENT_MEANS = {"meta_objective": "loss", "hidden_norm": "rms"}


def warn_nothing_left(step: int, max_steps: int) -> None:
    """Say that a resumed run has no meta-step left to run."""
    rank_zero_warn(
        f"MetaTrainer: the run resumes at meta-step {step} and max_steps is {max_steps}: nothing is left "
        "to run; raise --trainer.max_steps to continue it"
    )


def check_same_run(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a full checkpoint of another run; warn about settings that changed on resume."""
    if not saved:
        return
    saved, current = {**_ABSENT_MEANS, **saved}, {**_ABSENT_MEANS, **current}
    differ = [k for k in _SAME_RUN_KEYS if k in saved and saved[k] != current.get(k)]
    if differ:
        lines = "; ".join(f"{k}: checkpoint {saved[k]!r}, recipe {current.get(k)!r}" for k in differ)
        raise ValueError(
            f"MetaTrainer: the checkpoint comes from a different run ({lines}); resume with the recipe "
            "that wrote it, or start from its weights with --model.init_from"
        )
    changed = [k for k in ("schedule", "max_update_norm") if k in saved and saved[k] != current.get(k)]
    if changed:
        rank_zero_warn(
            "MetaTrainer: resuming with changed "
            + "; ".join(f"{k} ({saved[k]!r} -> {current.get(k)!r})" for k in changed)
            + ": the continuation differs from an uninterrupted run"
        )
