"""Evaluation: the μP coordinate-check width sweep (:mod:`.coord_sweep`), and the evaluation suites."""
