"""Two-process CPU DDP fit with Celo; each rank writes its final weights (used by the DDP test).

Run as ``python _ddp_script.py OUT_DIR``. Lightning's ``ddp`` strategy relaunches this script for
rank 1, so everything happens under ``__main__``. Each rank writes ``OUT_DIR/rank<r>.safetensors``
with its parameters, the loss Celo used at the last step (``last_loss``, averaged over the ranks),
the rank's own last training loss (``local_loss``) and how far the parameters moved (``change``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

import lightning_lopt as llo
from lightning_lopt.datamodules import DigitsDataModule
from lightning_lopt.models import MuMLP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for _process_group
from _process_group import tear_down  # noqa: E402


class LastLoss(llo.OptimizeeModule):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.local_loss = loss.detach().clone()
        return loss


def main(out_dir: Path) -> None:
    L.seed_everything(0)
    torch.set_num_threads(1)  # two processes on a small CPU budget
    module = LastLoss(MuMLP((1, 8, 8), width=32, depth=3, num_classes=10))
    start = [p.detach().clone() for p in module.parameters()]
    trainer = llo.Trainer(
        optimizer="celo",  # random meta-weights, seeded: identical on both ranks
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=out_dir,
    )
    trainer.fit(module, DigitsDataModule(batch_size=32))
    tensors = {name: p.detach().contiguous() for name, p in module.named_parameters()}
    tensors["last_loss"] = trainer.optimizers[0].last_loss.reshape(1)
    tensors["local_loss"] = module.local_loss.reshape(1).float()
    tensors["change"] = sum((p.detach() - s).abs().sum() for p, s in zip(module.parameters(), start)).reshape(1)
    save_file(tensors, str(out_dir / f"rank{trainer.global_rank}.safetensors"))
    tear_down()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
