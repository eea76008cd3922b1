"""Light checkpoints: written atomically, one step and a digest across the files, mixed directories refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import safetensors.torch

from lightning_lopt.meta import ImageMLPTask, LightCheckpoint, LogUniformLengthSchedule, MetaTrainer, PES
from lightning_lopt.meta.checkpoint import META_STATE_JSON, META_STATE_TENSORS

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"estimator": PES(num_pairs=2, trunc_length=5), "truncation": LogUniformLengthSchedule(8, 20), "initial_offset": 3}
FILES = {"model.safetensors", "card.json", META_STATE_TENSORS, META_STATE_JSON}


def _meta(**kwargs):
    return MetaTrainer("mulo", tasks=[ImageMLPTask("digits", widths=[8], depth=2, batch_size=16)], **SMALL, **kwargs)


@pytest.fixture(scope="module")
def saves(tmp_path_factory):
    """Light checkpoints of one run at steps 2 and 4: ``(dir_at_2, dir_at_4)``."""
    root = tmp_path_factory.mktemp("light")
    meta = _meta()

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 2:
                shutil.copytree(root / "light", root / "at2")

    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[LightCheckpoint(root / "light", every_n_steps=2), Keep()],
    )
    trainer.fit(meta)
    return root / "at2", root / "light"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_save_holds_one_step_and_a_digest_and_leaves_nothing_else(saves):
    at2, at4 = saves
    meta = json.loads((at4 / META_STATE_JSON).read_text())
    assert meta["meta_step"] == 4 and set(meta["digest"]) == FILES - {META_STATE_JSON}
    assert json.loads((at4 / "card.json").read_text())["meta_training_steps"] == 4
    assert {p.name for p in at4.iterdir()} == FILES
    assert sorted(p.name for p in at4.parent.iterdir()) == ["at2", "light"]  # no temporary directories left
    assert _meta(resume_from=str(at2))._light_state["meta_step"] == 2


def test_a_mixed_directory_is_refused_naming_the_files(saves, tmp_path):
    at2, at4 = saves
    mixed = _copy(at2, tmp_path / "mixed")
    for name in ("model.safetensors", "card.json"):
        shutil.copy(at4 / name, mixed / name)
    with pytest.raises(ValueError, match=r"model\.safetensors, card\.json do not match the digest in meta_state\.json \(step 2\)"):
        _meta(resume_from=str(mixed))


def test_a_legacy_directory_without_digest_is_checked_by_its_steps(saves, tmp_path):
    at2, at4 = saves
    legacy = _copy(at2, tmp_path / "legacy")
    meta = json.loads((legacy / META_STATE_JSON).read_text())
    del meta["digest"]
    meta["format_version"] = 1
    (legacy / META_STATE_JSON).write_text(json.dumps(meta))
    assert _meta(resume_from=str(legacy))._light_state["meta_step"] == 2
    for name in ("model.safetensors", "card.json"):
        shutil.copy(at4 / name, legacy / name)
    with pytest.raises(ValueError, match="card.json says step 4 but meta_state.json says step 2"):
        _meta(resume_from=str(legacy))


@pytest.mark.parametrize("recipe", ["mulo_m_cpu_warm", "lo_m_cpu_warm"])
def test_the_committed_light_checkpoints_still_load(recipe):
    lopt = "mulo" if recipe.startswith("mulo") else "lo"
    meta = MetaTrainer(lopt, tasks=[ImageMLPTask("digits", widths=[8], depth=2, batch_size=16)], **SMALL,
                       resume_from=str(ROOT / "checkpoints" / "meta" / recipe))
    assert meta._light_state["meta_step"] == 1000


def test_an_interrupted_save_leaves_the_previous_checkpoint_whole(saves, tmp_path, monkeypatch):
    at2, at4 = saves
    target = _copy(at2, tmp_path / "light")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    meta = _meta(resume_from=str(at4))
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(meta)

    real_save, calls = safetensors.torch.save_file, []

    def crash(*args, **kwargs):  # model.safetensors is written, then the disk fills up
        calls.append(args[1])
        if len(calls) > 1:
            raise OSError("disk full")
        real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        meta.save_light_checkpoint(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["light"]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_meta_state_names_the_file_and_the_fix(saves, tmp_path, damage):
    broken = _copy(saves[0], tmp_path / "broken")
    meta = json.loads((broken / META_STATE_JSON).read_text())
    del meta["digest"]  # a legacy checkpoint: the damage is found when the file is read
    (broken / META_STATE_JSON).write_text(json.dumps(meta))
    state = broken / META_STATE_TENSORS
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:100])
        with pytest.raises(ValueError, match=r"meta_state\.safetensors is truncated or corrupt.*--ckpt_path"):
            _meta(resume_from=str(broken))
    else:
        state.unlink()
        with pytest.raises(FileNotFoundError, match=r"missing meta_state\.safetensors"):
            _meta(resume_from=str(broken))


def test_a_malformed_meta_state_json_names_the_file(saves, tmp_path):
    broken = _copy(saves[0], tmp_path / "broken")
    (broken / META_STATE_JSON).write_text('{"meta_step": 2,')
    with pytest.raises(ValueError, match=r"meta_state\.json: not valid JSON \(.* line 1"):
        _meta(resume_from=str(broken))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        _meta(resume_from=str(tmp_path / "nowhere"))


def test_a_fine_tunes_card_names_the_weights_it_started_from_and_a_resume_keeps_them(saves, tmp_path):
    _, at4 = saves
    tune = _meta(init_from=str(at4))
    L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[LightCheckpoint(tmp_path / "tune", every_n_steps=2)],
    ).fit(tune)
    start = json.loads((at4 / "card.json").read_text())
    card = json.loads((tmp_path / "tune" / "card.json").read_text())
    assert start["compute"]["seconds"] > 0 and start["started_from"] is None
    assert card["meta_training_steps"] == 2
    assert card["started_from"] == {
        "source": str(at4), "recipe": start["recipe"]["name"], "meta_training_steps": 4,
        "compute_seconds": start["compute"]["seconds"], "started_from": None,
    }
    assert _meta(resume_from=str(tmp_path / "tune")).card()["started_from"] == card["started_from"]
    assert _meta().card()["started_from"] is None
