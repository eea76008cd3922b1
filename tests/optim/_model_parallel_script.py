"""Lightning's ModelParallelStrategy (FSDP2) on two gloo CPU processes with ``Trainer(optimizer="mulo")``.

Run as ``python _model_parallel_script.py OUT_DIR``. Lightning relaunches this script for rank 1,
so everything happens under ``__main__``. Each rank writes ``OUT_DIR/rank<r>.json``: whether the
parameters and the optimizer state are DTensors, how far the parameters moved, the gathered
parameters' checksum (equal on both ranks when the replicas agree), and the optimizer's iteration
after a fit resumed from Lightning's distributed checkpoint at step 3 and run to step 5.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

import lightning_lopt as llo
from lightning_lopt.datamodules import DigitsDataModule
from lightning_lopt.models import MuMLP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for _process_group
from _process_group import tear_down  # noqa: E402


class ShardedOptimizee(llo.OptimizeeModule):
    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.modules():
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def gathered(module: L.LightningModule) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in module.parameters()]


def make_trainer(out_dir: Path, max_steps: int) -> llo.Trainer:
    return llo.Trainer(
        optimizer="mulo",
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        devices=2,
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=out_dir,
    )


def main(out_dir: Path) -> None:
    L.seed_everything(0)
    torch.set_num_threads(1)
    module = ShardedOptimizee(MuMLP((1, 8, 8), width=24, depth=3, num_classes=10))
    start = [p.detach().clone() for p in module.parameters()]  # before sharding: full tensors
    trainer = make_trainer(out_dir, max_steps=3)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    # Lightning's distributed checkpoint of the sharded optimizer state, and a resumed fit.
    trainer.save_checkpoint(out_dir / "checkpoint")
    resumed = make_trainer(out_dir, max_steps=5)
    resumed_module = ShardedOptimizee(MuMLP((1, 8, 8), width=24, depth=3, num_classes=10))
    resumed.fit(resumed_module, DigitsDataModule(batch_size=32), ckpt_path=out_dir / "checkpoint")
    resumed_state = resumed.optimizers[0].state_dict()["state"]
    params = gathered(module)
    state = trainer.optimizers[0].state_dict()["state"]
    result = {
        "resumed_iterations": sorted({int(s["learned_optimizer.iteration"]) for s in resumed_state.values()}),
        "params_are_dtensor": all(type(p).__name__ == "DTensor" for p in module.parameters()),
        "state_is_dtensor": all(
            type(v).__name__ == "DTensor" for s in state.values() for k, v in s.items() if not k.startswith("learned_optimizer.")
        ),
        "moved": max(float((p - s).abs().max()) for p, s in zip(params, start)),
        "checksum": [float(p.double().sum()) for p in params],
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    tear_down()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
