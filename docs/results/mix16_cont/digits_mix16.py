"""The packaged digits checks of tests/optim/test_packaged_weights.py run with the long-run μLO weights
(mulo-fmnist8-16x16-mix10k) beside the default, at the default settings (lr 1, constant, no weight decay).
Run from the repository root: ``python docs/results/mix16_cont/digits_mix16.py``."""
import math, sys
sys.path.insert(0, "tests/optim")
from test_packaged_weights import _train_digits, _final
W = "mulo-fmnist8-16x16-mix10k"
for seed in (0, 1):
    m = _final(_train_digits("mulo", 300, seed, meta_weights=W))
    d = _final(_train_digits("mulo", 300, seed))
    a = _final(_train_digits("adamw", 300, seed, lr=1e-3))
    print("seed", seed, "mix16", round(m, 4), "default", round(d, 4), "adamw", round(a, 4))
losses, model = _train_digits("mulo", 10000, 0, meta_weights=W)
w = [sum(losses[i:i+100])/100 for i in range(0, len(losses), 100)]
print("windows", [round(x, 4) for x in w[::5]], "at1000", w[10], "last", w[-1], all(map(math.isfinite, losses)))
