"""A LightningModule and a LightningDataModule written the way a user writes them, for fine-tuning.

Nothing here knows about meta-training: an ordinary mup MLP classifier (``self.log`` in
``training_step``, its own ``configure_optimizers``) and a data module with a plain ``DataLoader``.
``configs/meta/finetune_example.yaml`` fine-tunes the packaged μLO on it:

    python train.py meta-fit --config configs/meta/finetune_example.yaml

The same module trains normally with any optimizer:

    python train.py fit --model examples.user_task.DigitsClassifier --data examples.user_task.SklearnDigits \
        --trainer.optimizer mulo --trainer.max_steps 300
"""

from __future__ import annotations

import lightning as L
import mup
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split


class DigitsClassifier(L.LightningModule):
    """A μP MLP (mup's MuReadout and base shapes) on flattened 8x8 digits."""

    def __init__(self, width: int = 64, lr: float = 0.01, set_shapes: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.readout = mup.MuReadout(width, 10)
        if set_shapes:
            # mup needs two copies that differ in every width to tell widths from fixed dimensions.
            mup.set_base_shapes(self, DigitsClassifier(8, set_shapes=False), delta=DigitsClassifier(16, set_shapes=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.body(x.flatten(1)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return mup.MuAdam(self.parameters(), lr=self.hparams.lr)


class SklearnDigits(L.LightningDataModule):
    """scikit-learn's 8x8 digits, standardised, split 80/20, served by plain DataLoaders."""

    num_classes = 10

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32)
        x = (x - x.mean()) / x.std()
        data = TensorDataset(x, torch.tensor(digits.target))
        self.train_set, self.val_set = random_split(data, [0.8, 0.2], generator=torch.Generator().manual_seed(0))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)
