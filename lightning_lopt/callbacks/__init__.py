"""Lightning callbacks of lightning_lopt.

``CoordCheck`` records per-layer coordinate statistics (μP's coordinate check) during any fit::

    from lightning_lopt.callbacks import CoordCheck
    trainer = lightning.Trainer(max_steps=10, callbacks=[CoordCheck(steps=(0, 1, 2, 5, 10))])
"""

from lightning_lopt.callbacks.coord_check import CoordCheck

__all__ = ["CoordCheck"]
