"""Lightning callbacks of lightning_lopt.

``CoordCheck`` records per-layer coordinate statistics (μP's coordinate check) during any fit::

    from lightning_lopt.callbacks import CoordCheck
    trainer = lightning.Trainer(max_steps=10, callbacks=[CoordCheck(steps=(0, 1, 2, 5, 10))])
"""

# The callback lives with the rest of the coordinate check; this is its public import path.
from lightning_lopt.coord_check.callback import CoordCheck

__all__ = ["CoordCheck"]
