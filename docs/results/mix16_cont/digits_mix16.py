"""The packaged digits checks of tests/optim/test_packaged_weights.py run with the long-run μLO weights
(mulo-fmnist8-16x16-mix10k) beside the default, at the default settings (lr 1, constant, no weight decay).

Run from the repository root: ``python docs/results/mix16_cont/digits_mix16.py`` (output: digits_mix16.txt).
"""

import math
import sys

sys.path.insert(0, "tests/optim")
from test_packaged_weights import _final, _train_digits  # noqa: E402  (the tests' own digits runs)

WEIGHTS = "mulo-fmnist8-16x16-mix10k"
for seed in (0, 1):
    mix16 = _final(_train_digits("mulo", 300, seed, meta_weights=WEIGHTS))
    default = _final(_train_digits("mulo", 300, seed))
    adamw = _final(_train_digits("adamw", 300, seed, lr=1e-3))
    print("seed", seed, "mix16", round(mix16, 4), "default", round(default, 4), "adamw", round(adamw, 4))
losses, _ = _train_digits("mulo", 10000, 0, meta_weights=WEIGHTS)
windows = [sum(losses[i : i + 100]) / 100 for i in range(0, len(losses), 100)]
# windows[10] is the one the packaged test calls "at the horizon" (steps 1001-1100).
print("windows", [round(x, 4) for x in windows[::5]], "at1000", windows[10], "last", windows[-1],
      all(map(math.isfinite, losses)))
