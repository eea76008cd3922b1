"""Evaluation of optimizers: suites against tuned baselines (the coordinate check is
:mod:`lightning_lopt.coord_check`).

One concept per module, the way learned_optimization keeps tasks, trainers and summaries apart:

- :mod:`.tasks`: task families (model kind, data, batch size, base width) and tasks, built with
  :func:`lightning_lopt.models.build`; :mod:`.data` loads their data sources by name;
- :mod:`.suites`: the suite YAML files of ``configs/eval/`` → groups of tasks;
- :mod:`.optimizers`: ``--optimizers`` entries (names, ``name:weights``, import paths) and how a
  run builds its ``torch.optim`` optimizer;
- :mod:`.runner` and :mod:`.store`: one run (a plain, seeded, single-threaded loop), and many of
  them with a cache keyed by (task, optimizer, seed, config hash), resume and a progress bar;
- :mod:`.tuning`: AdamW and μAdam grid searches at each family's base width;
- :mod:`.metrics`: pure functions: final loss, ranks, normalised loss, speedup, IQM, median,
  optimality gap, stratified bootstrap intervals;
- :mod:`.summary`, :mod:`.plots`, :mod:`.report`: tables, PNGs and the markdown report;
- :mod:`.plan`: a checked evaluation (what runs, with which settings, where it goes);
- :mod:`.evaluate`: the ``evaluate`` command, built on :mod:`.arguments` (jsonargparse, ``--config``,
  ``--seeds N``), which the ``coord-check`` command shares.

See ``docs/evaluation.md``.
"""
