"""What ``train.py`` silences: messages that say nothing about the user's run, filtered by their text.

- LightningCLI's warning that it got both ``args`` and ``sys.argv``: our commands pass the arguments
  they parsed on purpose;
- Lightning's ``isinstance(treespec, LeafSpec)`` FutureWarning (Lightning's own use of a torch API);
- Lightning's "💡 Tip: ... litlogger" and "... litmodels" advertisements, logged at the start of
  every fit.

Every other warning, including Lightning's other tips, still shows. The filters hold only inside
:func:`known_noise_filtered`, so importing the library changes nothing.

Example::

    with known_noise_filtered():
        LightningCLI(...)
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

#: ``(message regex, category)`` of the warnings silenced.
NOISE_WARNINGS = (
    (r"LightningCLI's args parameter is intended to run from within Python", UserWarning),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)
#: Start of the log messages silenced (Lightning's rank-zero messages).
NOISE_LOG_PREFIXES = ("💡 Tip: For seamless cloud logging", "💡 Tip: For seamless cloud uploads and versioning")


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def known_noise_filtered(extra_warnings: tuple[tuple[str, type[Warning]], ...] = ()) -> Iterator[None]:
    """Silence :data:`NOISE_WARNINGS` (plus ``extra_warnings``) and :data:`NOISE_LOG_PREFIXES` inside."""
    import lightning.pytorch  # noqa: F401  (points the rank-zero helpers at Lightning's logger)
    from lightning_utilities.core import rank_zero

    drop = _DropPrefixes(NOISE_LOG_PREFIXES)
    loggers = [rank_zero.log]
    with warnings.catch_warnings():
        for message, category in (*NOISE_WARNINGS, *extra_warnings):
            warnings.filterwarnings("ignore", message=message, category=category)
        for logger in loggers:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(drop)
