"""Data sources of the evaluation and the coordinate check, by name.

A source is anything with ``sample(batch_size, n, generator) -> (x, y)`` returning ``[n, batch_size,
...]`` tensors: the library's data modules (``digits``, ``mnist``, ``fashion_mnist``, ``text``) or
:class:`~lightning_lopt.datamodules.synthetic.SyntheticTokens`, a random bigram chain for offline LM checks. :func:`load_source` builds one
from a name and keyword arguments and keeps it for the process, so the many runs of a suite decode
MNIST or tokenize the Brown corpus once.

Example::

    from lightning_lopt.eval.data import load_source
    data = load_source("fashion_mnist", {"image_size": 28})
    x, y = data.sample(128, 10, torch.Generator().manual_seed(0))     # [10, 128, 1, 28, 28], [10, 128]
"""

from __future__ import annotations

import json
from typing import Any

from lightning_lopt.datamodules import DATAMODULES, get_datamodule
from lightning_lopt.datamodules.synthetic import SyntheticTokens

#: Names :func:`load_source` knows: the library's data modules and ``synthetic`` tokens.
SOURCES = ("synthetic", *DATAMODULES)

_LOADED: dict[str, Any] = {}


def load_source(name: str, kwargs: dict[str, Any] | None = None) -> Any:
    """The data source ``name`` built with ``kwargs``, set up, and kept for the process.

    Raises ``ValueError`` naming the known sources for an unknown name, and ``FileNotFoundError``
    saying how to fetch the data when it is not installed (from the data modules).
    """
    kwargs = dict(kwargs or {})
    if name not in SOURCES:
        raise ValueError(f"unknown data {name!r}; known: {', '.join(SOURCES)}")
    key = json.dumps([name, kwargs], sort_keys=True, default=str)
    if key not in _LOADED:
        if name == "synthetic":
            source: Any = SyntheticTokens(**kwargs)
        else:
            source = get_datamodule(name, **kwargs)
            source.setup()
        _LOADED[key] = source
    return _LOADED[key]
