"""InnerEvaluation: held-out losses logged per instance and as their mean; the best θ kept, across resumes."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from lightning_lopt.meta import ImageMLPTask, LightCheckpoint, LogUniformLengthSchedule, MetaTrainer, PES
from lightning_lopt.meta.checkpoint import META_STATE_JSON
from lightning_lopt.meta import inner_eval
from lightning_lopt.meta.inner_eval import MEAN_METRIC, InnerEvaluation

SMALL = {"estimator": PES(num_pairs=2, trunc_length=5), "truncation": LogUniformLengthSchedule(8, 20), "initial_offset": 3}


def _meta(**kwargs):
    return MetaTrainer("mulo", tasks=[ImageMLPTask("digits", widths=[8, 16], depth=2, batch_size=16)], **{**SMALL, **kwargs})


def _theta(module):
    return {k: v.detach().clone() for k, v in module.lopt.state_dict().items()}


class _ThetaPerStep(Callback):
    """θ at the start of the fit and after every meta-step, by global step."""

    def __init__(self):
        self.theta = {}

    def on_train_start(self, trainer, pl_module):
        self.theta[trainer.global_step] = _theta(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.theta[trainer.global_step] = _theta(pl_module)


def _script(monkeypatch, values):
    """Make each evaluation (one inner_loss_curve call per instance) report the next of ``values``."""
    calls = []

    def fake_curve(lopt, inst, steps, seeds):
        calls.append(inst.label)
        return torch.full((steps, len(list(seeds))), values[(len(calls) - 1) // 2])

    monkeypatch.setattr(inner_eval, "inner_loss_curve", fake_curve)
    return calls


def test_logs_each_instance_and_their_mean(tmp_path, fit_kwargs):
    meta = _meta()
    trainer = L.Trainer(**fit_kwargs(tmp_path, 2, callbacks=[InnerEvaluation(every_n_steps=2, steps=20, num_seeds=2)]))
    trainer.fit(meta)
    per_instance = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("meta/eval/") and k != MEAN_METRIC}
    assert sorted(per_instance) == sorted(f"meta/eval/{inst.label}" for inst in meta.instances)
    # the logged value is the held-out runs' own: recompute one with the final θ
    label = meta.instances[0].label
    again = float(inner_eval.inner_loss_curve(meta.lopt, meta.instances[0], 20, range(2))[-10:].mean())
    assert per_instance[f"meta/eval/{label}"] == pytest.approx(again, rel=1e-6)
    assert float(trainer.callback_metrics[MEAN_METRIC]) == pytest.approx(sum(per_instance.values()) / 2, rel=1e-6)


def test_keeps_the_best_theta_and_a_resume_only_replaces_it_with_a_better_one(tmp_path, fit_kwargs, monkeypatch):
    best = tmp_path / "best"
    calls = _script(monkeypatch, [0.5, 0.4, 0.6, 0.3, 0.35])  # start, then steps 1-4
    record = _ThetaPerStep()
    meta = _meta()
    L.Trainer(**fit_kwargs(tmp_path / "a", 4, callbacks=[record, InnerEvaluation(1, steps=20, best_dirpath=best)])).fit(meta)
    assert len(calls) == 2 * 5
    card = json.loads((best / "card.json").read_text())
    assert card["meta_training_steps"] == 3 and card["selected_by"]["value"] == pytest.approx(0.3)
    assert card["selected_by"]["steps"] == 20 and card["selected_by"]["instances"] == [i.label for i in meta.instances]
    saved = load_file(str(best / "model.safetensors"))
    for name, value in record.theta[3].items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=0)
    assert not torch.equal(record.theta[3]["mlp.0.weight"], record.theta[4]["mlp.0.weight"])  # step 4 moved θ
    torch.testing.assert_close(_theta(_meta(resume_from=str(best))), record.theta[3])  # a light checkpoint

    # A later fit measured the same way reads 0.3 from the card: no start evaluation, 0.31 is not better, 0.25 is.
    calls = _script(monkeypatch, [0.31, 0.25])
    record = _ThetaPerStep()
    L.Trainer(**fit_kwargs(tmp_path / "b", 2, callbacks=[record, InnerEvaluation(1, steps=20, best_dirpath=best)])).fit(_meta())
    assert len(calls) == 2 * 2
    card = json.loads((best / "card.json").read_text())
    assert card["selected_by"]["value"] == pytest.approx(0.25) and card["selected_by"]["meta_step"] == 2
    torch.testing.assert_close(load_file(str(best / "model.safetensors")), record.theta[2], rtol=0, atol=0)

    # Measured another way (other horizon): the recorded value is not comparable; warned, then replaced.
    _script(monkeypatch, [0.9, 0.8])
    with pytest.warns(UserWarning, match="not selected by this evaluation"):
        L.Trainer(**fit_kwargs(tmp_path / "c", 1, callbacks=[InnerEvaluation(1, steps=30, best_dirpath=best)])).fit(_meta())
    card = json.loads((best / "card.json").read_text())
    assert card["selected_by"]["value"] == pytest.approx(0.8) and card["selected_by"]["steps"] == 30


def test_the_last_theta_is_a_candidate_between_evaluations(tmp_path, fit_kwargs, monkeypatch):
    best = tmp_path / "best"
    calls = _script(monkeypatch, [0.5, 0.4, 0.1])  # start, step 2, the end at step 3
    record = _ThetaPerStep()
    L.Trainer(**fit_kwargs(tmp_path, 3, callbacks=[record, InnerEvaluation(2, steps=20, best_dirpath=best)])).fit(_meta())
    assert len(calls) == 2 * 3
    card = json.loads((best / "card.json").read_text())
    assert card["meta_training_steps"] == 3 and card["selected_by"]["value"] == pytest.approx(0.1)
    torch.testing.assert_close(load_file(str(best / "model.safetensors")), record.theta[3], rtol=0, atol=0)


def test_the_starting_theta_is_kept_when_meta_training_only_makes_it_worse(tmp_path, fit_kwargs, monkeypatch):
    best = tmp_path / "best"
    _script(monkeypatch, [0.2, 0.3, 0.4, float("nan")])
    record = _ThetaPerStep()
    L.Trainer(**fit_kwargs(tmp_path, 3, callbacks=[record, InnerEvaluation(1, steps=20, best_dirpath=best)])).fit(_meta())
    card = json.loads((best / "card.json").read_text())
    assert card["meta_training_steps"] == 0 and card["selected_by"]["value"] == pytest.approx(0.2)
    torch.testing.assert_close(load_file(str(best / "model.safetensors")), record.theta[0], rtol=0, atol=0)


def test_a_resumed_runs_starting_theta_is_kept_as_a_checkpoint_it_can_continue_from(tmp_path, fit_kwargs, monkeypatch):
    light, best = tmp_path / "light", tmp_path / "best"
    L.Trainer(**fit_kwargs(tmp_path / "a", 2, callbacks=[LightCheckpoint(light, every_n_steps=2)])).fit(_meta())
    _script(monkeypatch, [0.2, 0.3])  # the start (meta-step 2) is best
    resumed = _meta(resume_from=str(light))
    start = _theta(resumed)
    L.Trainer(**fit_kwargs(tmp_path / "b", 3, callbacks=[InnerEvaluation(1, steps=20, best_dirpath=best)])).fit(resumed)
    card = json.loads((best / "card.json").read_text())
    assert card["meta_training_steps"] == 2 and card["selected_by"]["meta_step"] == 2
    torch.testing.assert_close(load_file(str(best / "model.safetensors")), start, rtol=0, atol=0)
    # the meta-optimizer state is the resumed run's (AdamW's step 2), not an empty one
    assert json.loads((best / META_STATE_JSON).read_text())["meta_step"] == 2
    again = _meta(resume_from=str(best))
    trainer = L.Trainer(**fit_kwargs(tmp_path / "c", 3))
    trainer.fit(again)
    assert float(again.optimizers().optimizer.state_dict()["state"][0]["step"]) == 3  # continued from 2


def test_a_full_checkpoint_older_than_the_kept_theta_does_not_lower_the_bar(tmp_path):
    evaluation = InnerEvaluation(1, steps=20)
    evaluation.best = 0.17  # read from best_dirpath's card in setup
    evaluation.load_state_dict({"best": 0.18})  # the full checkpoint was written before that θ
    assert evaluation.best == 0.17
    fresh = InnerEvaluation(1, steps=20)
    fresh.load_state_dict({"best": 0.18})
    assert fresh.best == 0.18 and InnerEvaluation(1, steps=20).state_dict() == {"best": None}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"every_n_steps": 0}, "every_n_steps must be an integer >= 1"), ({"steps": 5}, "steps must be an integer >= 10"),
     ({"num_seeds": 1.5}, "num_seeds must be an integer >= 1")],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InnerEvaluation(**kwargs)
