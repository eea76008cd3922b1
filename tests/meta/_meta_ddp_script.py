"""Meta-training under DDP with 2 gloo CPU processes; rank 0 writes θ (used by the DDP test).

Run as ``python _meta_ddp_script.py OUT_DIR DEVICES``. Lightning's ``ddp`` strategy relaunches this
script for rank 1, so everything happens under ``__main__``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

from lightning_lopt.meta import ImageMLPTask, LogUniformLengthSchedule, MetaTrainer, PES

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for _process_group
from _process_group import tear_down  # noqa: E402


def build() -> MetaTrainer:
    task = ImageMLPTask("digits", widths=[8, 16], depth=2, batch_size=16)
    return MetaTrainer(
        "mulo", tasks=[task], estimator=PES(num_pairs=4, trunc_length=5),
        truncation=LogUniformLengthSchedule(8, 20), initial_offset=3, seed=5,
    )


def main(out_dir: Path, devices: int) -> None:
    torch.set_num_threads(1)
    meta = build()
    trainer = L.Trainer(
        strategy="ddp" if devices > 1 else "auto", devices=devices, accelerator="cpu", max_steps=4,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=out_dir,
    )
    trainer.fit(meta)
    theta = {k: v.detach().contiguous() for k, v in meta.lopt.state_dict().items()}
    save_file(theta, str(out_dir / f"theta_devices{devices}_rank{trainer.global_rank}.safetensors"))
    tear_down()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
