"""End-to-end training throughput of the learned optimizers against AdamW / μAdam, in one run.

Two cases (issue 18's targets), each a plain PyTorch loop (forward, backward, ``optimizer.step``)
timed with a device sync at both ends of the timed steps:

- ``lm``: :class:`lightning_lopt.models.MuTransformerLM` (μP, byte-level: vocab 256, width 1024,
  depth 3, 8 heads), batch 32 x 64 tokens, 2000 steps, μAdam (lr 1e-2) vs MuLO (the default GPU
  step, fast numerics) vs MuLO in exact numerics. The tokens come from a fixed random order-1 Markov
  chain (each byte has 4 likely successors), so the loss falls and the curves of the two numeric
  modes can be compared: the record keeps the loss every 50 steps and the largest difference
  between MuLO fast and exact.
- ``vit``: torchvision's ``vit_b_16`` on random 224x224 images and 1000 labels, batch 32, bf16
  autocast (``bf16-mixed``), fused AdamW vs MuLO (scales 1: the step's cost does not depend on
  them), LO and Celo; samples/s over the timed steps after a warm-up.

Ratios are against the first optimizer of the case (μAdam / AdamW) measured in the same run.
JSON to ``benchmarks/results/end_to_end-<device>-<date>.json``.

Usage::

    python -m benchmarks.bench_end_to_end --device cuda             # both cases, full size
    python -m benchmarks.bench_end_to_end --quick                   # tiny CPU smoke run (seconds)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.bench_optimizer_step import RESULTS_DIR, machine_info, version_info

BENCHMARK = "end_to_end"
SCHEMA_VERSION = 1
LOSS_EVERY = 50

#: name → (width, depth, heads, batch, seq_len, steps) for the LM; (image, patch, layers, width, batch, steps) for ViT.
PRESETS = {
    "full": {"lm": (1024, 3, 8, 32, 64, 2000), "vit": (224, 16, 12, 768, 32, 60)},
    "quick": {"lm": (32, 1, 2, 4, 16, 6), "vit": (32, 16, 1, 32, 2, 4)},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def markov_tokens(steps: int, batch: int, seq_len: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """``[steps, batch, seq_len + 1]`` bytes from a fixed random chain: 4 likely successors per byte."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, 256, (256, 4), generator=g)
    tokens = torch.empty(steps * batch, seq_len + 1, dtype=torch.int64)
    tokens[:, 0] = torch.randint(0, 256, (steps * batch,), generator=g)
    for t in range(1, seq_len + 1):
        pick = torch.randint(0, 4, (steps * batch,), generator=g)
        noise = torch.rand(steps * batch, generator=g) < 0.1
        nxt = successors[tokens[:, t - 1], pick]
        tokens[:, t] = torch.where(noise, torch.randint(0, 256, (steps * batch,), generator=g), nxt)
    return tokens.view(steps, batch, seq_len + 1).to(device)


def _build(name: str, model: torch.nn.Module, steps: int) -> torch.optim.Optimizer:
    import lightning_lopt as llo
    from lightning_lopt.optim.baselines import MuAdam

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random meta-weights where none are packaged: same cost
        if name == "muadam":
            return MuAdam(model.parameters(), lr=1e-2)
        if name == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=next(model.parameters()).is_cuda)
        if name in ("mulo", "mulo-exact"):
            opt = llo.MuLO(model.parameters(), allow_sp=True)
            opt.gpu_numerics = "exact" if name == "mulo-exact" else "fast"
            return opt
        if name == "lo":
            return llo.LO(model.parameters())
        if name == "celo":
            return llo.Celo(model.parameters(), num_steps=steps)
    raise ValueError(f"unknown optimizer {name!r}")


def _train(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    warmup: int,
    device: torch.device,
    autocast: torch.dtype | None,
) -> dict[str, Any]:
    """Train ``steps`` steps; time the steps after ``warmup``; losses every LOSS_EVERY steps."""
    losses: list[float] = []
    start = 0.0
    for step in range(steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        x, y = batches(step)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if hasattr(opt, "set_loss_hint"):
            opt.step(loss=loss.detach())
        else:
            opt.step()
        if step % LOSS_EVERY == 0 or step == steps - 1:
            losses.append(float(loss.detach()))  # a host sync every LOSS_EVERY steps only
    _sync(device)
    timed = steps - warmup
    wall = time.perf_counter() - start
    return {"timed_steps": timed, "wall_s": wall, "ms_per_step": 1e3 * wall / timed, "losses": losses}


def run_lm(optimizers: Sequence[str], cfg: tuple, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    from lightning_lopt.models import MuTransformerLM

    width, depth, heads, batch, seq_len, steps = cfg
    data = markov_tokens(steps, batch, seq_len, device)
    results = []
    for name in optimizers:
        torch.manual_seed(0)
        model = MuTransformerLM(vocab_size=256, seq_len=seq_len, width=width, depth=depth, heads=heads).to(device)
        opt = _build(name, model, steps)
        r = _train(
            model, opt, lambda s: (data[s, :, :-1], data[s, :, 1:]),
            lambda logits, y: F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)),
            steps, min(10, steps // 2), device, None,
        )
        r["optimizer"] = name
        results.append(r)
        log(f"   lm {name:<11} {r['ms_per_step']:8.2f} ms/step  wall {r['wall_s']:.1f} s  final loss {r['losses'][-1]:.3f}")
        del model, opt
    _ratios(results, "ms_per_step")
    by_name = {r["optimizer"]: r for r in results}
    if "mulo" in by_name and "mulo-exact" in by_name:
        fast, exact = by_name["mulo"]["losses"], by_name["mulo-exact"]["losses"]
        diff = [abs(a - b) for a, b in zip(fast, exact)]
        by_name["mulo"]["max_loss_difference_vs_exact"] = max(diff) if all(map(math.isfinite, diff)) else None
    return {"name": "lm", "config": dict(zip(("width", "depth", "heads", "batch", "seq_len", "steps"), cfg)), "results": results}


def run_vit(optimizers: Sequence[str], cfg: tuple, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    from torchvision.models import VisionTransformer

    image, patch, layers, width, batch, steps = cfg
    classes = 1000 if image == 224 else 10
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, image, image, device=device, generator=g)
    y = torch.randint(0, classes, (batch,), device=device, generator=g)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    results = []
    for name in optimizers:
        torch.manual_seed(0)
        model = VisionTransformer(image, patch, layers, max(1, width // 64), width, 4 * width, num_classes=classes).to(device)
        opt = _build(name, model, steps)
        r = _train(model, opt, lambda s: (x, y), F.cross_entropy, steps, min(10, steps // 2), device, autocast)
        r["optimizer"] = name
        r["samples_per_s"] = batch / (r["ms_per_step"] / 1e3)
        results.append(r)
        log(f"   vit {name:<10} {r['ms_per_step']:8.2f} ms/step  {r['samples_per_s']:8.1f} samples/s")
        del model, opt
    _ratios(results, "samples_per_s")
    return {"name": "vit", "config": dict(zip(("image", "patch", "layers", "width", "batch", "steps"), cfg)), "results": results}


def _ratios(results: list[dict[str, Any]], key: str) -> None:
    """``ratio_vs_baseline``: each result's ``key`` over the first result's (the baseline)."""
    for r in results:
        r["ratio_vs_baseline"] = r[key] / results[0][key]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_end_to_end", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny configuration (CPU smoke test)")
    parser.add_argument("--cases", nargs="+", choices=["lm", "vit"], default=["lm", "vit"])
    parser.add_argument("--lm-optimizers", nargs="+", default=["muadam", "mulo", "mulo-exact"])
    parser.add_argument("--vit-optimizers", nargs="+", default=["adamw", "mulo", "lo", "celo"])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    preset = PRESETS["quick" if args.quick else "full"]
    started = datetime.datetime.now(datetime.timezone.utc)
    log = lambda line: print(line, flush=True)  # noqa: E731
    record = {
        "benchmark": BENCHMARK,
        "schema_version": SCHEMA_VERSION,
        "started": started.isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "versions": version_info(),
        "config": {"device": args.device, "quick": args.quick, "argv": list(sys.argv[1:] if argv is None else argv)},
        "cases": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{BENCHMARK}-quick" if args.quick else BENCHMARK
    path = args.out / f"{name}-{args.device}-{started.date().isoformat()}.json"
    runs = {"lm": (run_lm, args.lm_optimizers), "vit": (run_vit, args.vit_optimizers)}
    for case in args.cases:
        run, optimizers = runs[case]
        record["cases"].append(run(optimizers, preset[case], device, log))
        # Written after every case, so that a run stopped by a time limit keeps what it measured.
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
