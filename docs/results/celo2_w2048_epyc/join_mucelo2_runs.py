"""Join MuCelo2's width runs from two machines into one ``runs.csv`` that ``scripts/paired_runs.py`` pairs per seed.

Seeds 0-4 ran on the Xeon in section 13 (``docs/results/mucelo2_spectral/width*/runs.csv``); those files have no
``machine`` column, and being two files they would count as two machines, so their 1024 and 2048 runs would not
pair. They are given the Xeon's machine string: section 16 re-ran them there bit for bit. Seeds 5-9 ran on the AMD
EPYC (the twentieth and twenty-first sessions; section 26), each seed's widths on that one machine. A seed's change from one width to the next is then
taken within one machine, and those changes pool across seeds.

Run from the repository root, with the per-seed evaluations under ``outputs/results/s2*/``::

    python docs/results/celo2_w2048_epyc/join_mucelo2_runs.py
    python scripts/paired_runs.py docs/results/celo2_w2048_epyc/mucelo2_width_runs.csv --baselines "" --widths
"""
import csv
import glob

OUT = "docs/results/celo2_w2048_epyc/mucelo2_width_runs.csv"
XEON = (
    "Intel(R) Xeon(R) Processor, AVX512, torch 2.14.1+cu130 "
    "(section 13's runs; section 16 reproduced them bit for bit there)"
)
SECTION_13 = ["docs/results/mucelo2_spectral/width/runs.csv", "docs/results/mucelo2_spectral/width2048/runs.csv"]
FIELDS = ["task", "optimizer", "seed", "final_loss", "diverged_at", "wall_s", "cached", "device", "machine", "path"]

rows = []
for path in SECTION_13:
    for row in csv.DictReader(open(path)):
        rows.append({**row, "machine": XEON})
for path in sorted(glob.glob("outputs/results/s2*/mucelo2_w*_s*/runs.csv")):
    rows.extend(csv.DictReader(open(path)))
with open(OUT, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows({k: row.get(k, "") for k in FIELDS} for row in rows)
print(f"{len(rows)} runs -> {OUT}")
