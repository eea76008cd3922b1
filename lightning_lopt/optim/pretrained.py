"""Safe learned-optimizer weight files: safetensors plus a JSON card
(docs/reference/design.md#contract-4-weights-are-safe-files).

A saved optimizer is a directory with

- ``model.safetensors``: exactly the module's ``state_dict()`` (θ);
- ``card.json``: ``architecture``, ``config`` (constructor keywords), ``lightning_lopt_version``,
  ``format_version``, ``recipe``, ``meta_training_steps``, ``data``, ``tasks``, ``commit`` (the git
  commit of the lightning_lopt source tree, when it is a git checkout) and ``num_meta_params``.

Nothing is ever unpickled: ``.pt``/``.pth``/``.ckpt``/``.bin`` files and any file that is not
safetensors are refused before their content is parsed.

Example::

    from lightning_lopt.optim.architectures import SmallFCLOpt
    from lightning_lopt.optim.pretrained import from_pretrained, save_pretrained

    save_pretrained(SmallFCLOpt(), "runs/my-lo", recipe={"outer_steps": 5000}, tasks=["mlp-w128"])
    lopt = from_pretrained("runs/my-lo")   # or a packaged name ("mulo-fmnist8-w32-128"), or a hub repo id
    lopt = SmallFCLOpt.from_pretrained("runs/my-lo")
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar

import safetensors
import safetensors.torch
import torch
from torch import nn

from lightning_lopt import __version__, provenance

WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "card.json"
FORMAT_VERSION = 1
PACKAGED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
HUB_TIMEOUT_S = 5.0
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` as methods; subclasses register by ``architecture``.

    A subclass must define the class attribute ``architecture`` (the card's name for it) and a
    ``config`` property returning its JSON-serialisable constructor keywords.

    The built-in architectures (``architectures``, ``celo2_lopt``) import this module, never the
    reverse: they are declared by the time anyone can call :func:`from_pretrained`, because the
    package ``lightning_lopt.optim`` imports them before any of its modules is used.
    """

    architecture: ClassVar[str]
    registry: ClassVar[dict[str, type[nn.Module]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "architecture" in cls.__dict__:
            PretrainedMixin.registry[cls.architecture] = cls  # type: ignore[assignment]

    def save_pretrained(self, directory: str | Path, **card: Any) -> Path:
        """Write ``model.safetensors`` and ``card.json`` to ``directory``; see :func:`save_pretrained`."""
        return save_pretrained(self, directory, **card)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> Any:
        """Load weights saved for this class; see :func:`from_pretrained`."""
        module = from_pretrained(name_or_path)
        if not isinstance(module, cls):
            raise TypeError(
                f"{name_or_path}: the card says architecture {module.architecture!r}, "
                f"not {cls.architecture!r}; use lightning_lopt.optim.pretrained.from_pretrained"
            )
        return module


def save_pretrained(
    module: nn.Module,
    directory: str | Path,
    *,
    recipe: dict[str, Any] | None = None,
    meta_training_steps: int | None = None,
    data: Any = None,
    tasks: list[str] | None = None,
    **extra: Any,
) -> Path:
    """Save ``module`` (a registered learned-optimizer module) and its card; returns the directory.

    ``extra`` adds JSON-serialisable card fields (e.g. ``compute``, ``evaluation``).
    """
    architecture = getattr(module, "architecture", None)
    if architecture not in PretrainedMixin.registry:
        raise TypeError(f"save_pretrained needs a learned-optimizer module, got {type(module).__name__}")
    card = {
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "config": module.config,
        "lightning_lopt_version": __version__,
        "recipe": recipe,
        "meta_training_steps": meta_training_steps,
        "data": data,
        "tasks": tasks,
        "commit": provenance.git_commit(),
        "num_meta_params": sum(t.numel() for t in module.state_dict().values()),
        **extra,
    }
    try:
        card_text = json.dumps(card, indent=2, sort_keys=True)
    except TypeError as err:
        raise TypeError(f"save_pretrained: the card must be JSON-serialisable ({err})") from err
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    safetensors.torch.save_file(tensors, str(out / WEIGHTS_NAME), metadata={"architecture": architecture})
    (out / CARD_NAME).write_text(card_text + "\n")
    return out


def available() -> list[str]:
    """Names of the optimizers packaged with lightning_lopt (``lightning_lopt/pretrained/<name>``)."""
    if not PACKAGED_DIR.is_dir():
        return []
    return sorted(d.name for d in PACKAGED_DIR.iterdir() if (d / CARD_NAME).is_file())


def from_pretrained(name_or_path: str | Path) -> nn.Module:
    """Build the learned-optimizer module described by a saved card and load its weights.

    ``name_or_path`` is, in this order: a local directory (holding ``model.safetensors`` and
    ``card.json``) or a ``.safetensors`` file with ``card.json`` beside it; a packaged name (see
    :func:`available`); a Hugging Face Hub repo id ``owner/name``, fetched with
    ``huggingface_hub.snapshot_download``.

    Raises:
        FileNotFoundError: nothing matches (the message lists the packaged names).
        ConnectionError: a hub repo id was given but the hub cannot be reached (offline).
        ValueError: a pickle or non-safetensors file, or missing, extra or mis-shaped tensors.
    """
    where = locate(name_or_path)
    if isinstance(where, str):
        try:
            weights, card_path = _local_files(_download(where))
        except ConnectionError as err:
            path = Path(where).expanduser()
            raise ConnectionError(f"{where!r}: no such directory ({path.resolve()}); as a hub repo id: {err}") from err
    else:
        weights, card_path = _local_files(where)
    return _build(weights, card_path)


def locate(name_or_path: str | Path) -> Path | str:
    """Where weights named ``name_or_path`` are, in :func:`from_pretrained`'s order, without loading them.

    Returns the local directory or file (an existing path, or a packaged name's directory), or the
    Hugging Face Hub repo id as a string (not fetched here).

    Raises:
        FileNotFoundError: nothing matches (the message lists the packaged names).
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if text in available():
        return PACKAGED_DIR / text
    if _REPO_ID.match(text) and not _meant_as_path(text, path):
        return text
    if _REPO_ID.match(text):
        raise FileNotFoundError(
            f"{text!r}: no such directory ({path.resolve()}); give the directory that save_pretrained or "
            f"LightCheckpoint wrote, a packaged name ({available() or 'none packaged yet'}) or a hub repo id"
        )
    raise FileNotFoundError(
        f"{text!r}: no such directory ({path.resolve()}), and not a packaged learned optimizer (available: "
        f"{available() or 'none packaged yet'}) or a hub repo id 'owner/name'"
    )


def _meant_as_path(text: str, path: Path) -> bool:
    """A missing ``a/b`` is a local path, not a hub repo id, when it starts with ``.``/``~`` or ``a`` is a
    local directory (``runs/my-run`` beside an existing ``runs/``)."""
    return text.startswith((".", "~")) or (path.parent != Path(".") and path.parent.is_dir())


def _local_files(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            hint = f" (found {pickles}: pickle files are never loaded)" if pickles else ""
            raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME}{hint}")
    else:
        weights = path
    _check_safetensors(weights)
    card = weights.parent / CARD_NAME
    if not card.is_file():
        raise FileNotFoundError(f"{weights}: no {CARD_NAME} beside it; save with save_pretrained")
    return weights, card


def _check_safetensors(path: Path) -> None:
    """Refuse anything that is not a safetensors file by its name and first bytes, unparsed."""
    refusal = (
        f"{path} is not a safetensors file{{}}. lightning_lopt never unpickles weights (pickle can run "
        "arbitrary code); convert it with safetensors.torch.save_file(state_dict, 'model.safetensors') "
        "in a trusted environment"
    )
    if path.suffix in _PICKLE_SUFFIXES:
        raise ValueError(refusal.format(f" ({path.suffix} is a pickle-based format)"))
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    header_len = int.from_bytes(head[:8], "little") if len(head) == 9 else -1
    if 0 < header_len <= size - 8 and head[8:9] == b"{":
        return
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":  # pickle protocol ≥ 2 / torch.save zip
        raise ValueError(refusal.format(" (it is a pickle / torch.save archive)"))
    raise ValueError(refusal.format(""))


def _download(repo_id: str) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    try:
        local = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=[WEIGHTS_NAME, CARD_NAME], etag_timeout=HUB_TIMEOUT_S
        )
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(f"hub repo {repo_id!r} does not exist or is private") from err
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError) as err:
        raise ConnectionError(
            f"cannot fetch {repo_id!r}: the Hugging Face Hub is unreachable (offline, or "
            f"HF_HUB_OFFLINE=1) and it is not in the local cache. Download {WEIGHTS_NAME} and "
            f"{CARD_NAME} where there is a network and pass their directory, or use a packaged "
            f"name ({available() or 'none packaged yet'}). Hub said: {err}"
        ) from err
    return Path(local)


def _build(weights: Path, card_path: Path) -> nn.Module:
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{card_path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); restore it "
            "from the same save as the weights beside it, or re-save them with save_pretrained"
        ) from err
    architecture = card.get("architecture")
    cls = PretrainedMixin.registry.get(architecture)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(
            f"{card_path}: unknown architecture {architecture!r} "
            f"(known: {sorted(PretrainedMixin.registry)})"
        )
    try:
        module = cls(**card.get("config", {}))
    except TypeError as err:
        raise ValueError(
            f"{card_path}: its config does not fit architecture {architecture!r} ({err}); the card was edited "
            "or belongs to other weights: restore it from the same save, or re-save the weights with save_pretrained"
        ) from err
    try:
        tensors = safetensors.torch.load_file(str(weights))
    except safetensors.SafetensorError as err:
        raise ValueError(f"{weights}: corrupt safetensors file ({err})") from err
    load_checked(module, tensors, str(weights))
    module.card = card
    return module


def load_checked(module: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(tensors)`` with errors that name each offending tensor."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{source}: tensors do not match {type(module).__name__}: missing {missing}, extra {extra}"
        )
    for name, ref in expected.items():
        if tensors[name].shape != ref.shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {list(tensors[name].shape)}, "
                f"{type(module).__name__} expects {list(ref.shape)}"
            )
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})

