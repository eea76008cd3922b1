"""Command-line conventions shared by ``evaluate`` and ``coord-check``.

Both parse with jsonargparse (which LightningCLI already brings): every flag can also come from a
``--config`` YAML file, ``--print_config`` shows the resolved configuration, and values are typed the
same way everywhere:

* ``--seeds N`` means N seeds, ``0..N-1``; an explicit list is ``--seeds 0,3,7`` or ``--seeds
  [0,3,7]`` (one seed: ``--seeds [2]``);
* lists are comma-separated (``--widths 64,128``) or YAML lists (``--widths [64,128]``);
* per-optimizer keyword arguments are a JSON/YAML mapping (``--optimizer-kwargs '{"adamw": {"lr": 1e-3}}'``).

Checks that need more than a type (an unknown suite, a bad seed) raise ``ValueError`` naming the
flag; :func:`run_command` turns them into a usage error (exit status 2) before anything runs.

Example::

    resolve_seeds(3)            # [0, 1, 2]
    resolve_seeds("0,3,7")      # [0, 3, 7]
    int_list("64,128", "--widths")
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser


def _items(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.strip().strip("[]").split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def int_list(value: Any, flag: str, *, minimum: int = 0) -> list[int]:
    """Integers from ``"1,2"``, ``[1, 2]`` or ``1``; ``ValueError`` naming ``flag`` otherwise."""
    out = []
    for item in _items(value):
        try:
            number = int(item) if not isinstance(item, bool) and float(item) == int(float(item)) else None
        except (TypeError, ValueError):
            number = None
        if number is None or number < minimum:
            raise ValueError(f"{flag}: expected integers >= {minimum}, got {value!r}")
        out.append(number)
    if not out:
        raise ValueError(f"{flag}: empty list")
    return out


def str_list(value: Any, flag: str) -> list[str]:
    """Strings from ``"a,b"`` or ``["a", "b"]``; ``ValueError`` naming ``flag`` for an empty list."""
    out = [str(v) for v in _items(value)]
    if not out:
        raise ValueError(f"{flag}: empty list")
    return out


def resolve_seeds(value: int | str | Sequence[int], flag: str = "--seeds") -> list[int]:
    """The seeds a ``--seeds`` value means: an integer N is N seeds ``0..N-1``; a list (comma-
    separated or YAML) is those seeds. Duplicates are an error."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"{flag}: the number of seeds must be at least 1, got {value}")
        return list(range(value))
    if isinstance(value, str) and "," not in value and "[" not in value:
        return resolve_seeds(int_list(value, flag, minimum=1)[0], flag)
    seeds = int_list(value, flag)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{flag}: seeds repeat in {value!r}")
    return seeds


def new_parser(prog: str, description: str) -> ArgumentParser:
    """A jsonargparse parser with ``--config``; flags are added by each command."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of any of the flags below")
    return parser


def run_command(parser: ArgumentParser, argv: Sequence[str] | None, run: Callable[[Any], None]) -> None:
    """Parse ``argv`` and call ``run(namespace)``; a ``ValueError`` raised by the argument checks
    before any work starts becomes a usage error naming the flag (exit status 2)."""
    args = parser.parse_args(_inline_dash_values(sys.argv[1:] if argv is None else argv))  # type errors exit 2
    try:
        run(args)
    except UsageError as err:
        parser.error(str(err))


def _inline_dash_values(argv: Sequence[str]) -> list[str]:
    """``--flag -64,128`` → ``--flag=-64,128``: argparse takes a value that starts with ``-`` and a digit
    for an option and reports "expected one argument"; inlined, it reaches the flag's own check."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.match(r"-[\d.]", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


class UsageError(ValueError):
    """A bad argument found by a command's checks, before any run starts."""


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    """The command as a user would type it, for reports."""
    args = list(sys.argv[1:] if argv is None else argv)
    return f"python train.py {prog} " + " ".join(shlex.quote(a) for a in args)
