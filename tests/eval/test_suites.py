"""Suite files and task families (lightning_lopt.eval.suites, .tasks)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lightning_lopt.eval import suites
from lightning_lopt.eval.suites import load_suite
from lightning_lopt.eval.tasks import Family, Task, build_model


@pytest.mark.parametrize("size", suites.SIZES)
@pytest.mark.parametrize("name", ["ci", "width", "depth", "horizon", "diverse"])
def test_every_committed_suite_loads_and_every_task_builds(name: str, size: str) -> None:
    suite = load_suite(name, size)
    assert suite.tasks() and suite.name == name
    for task in suite.tasks():
        # On the meta device: the full-size widths cost no memory. Sizes come from the family's
        # data, faked here so that the test needs no data set installed.
        source = _FakeSource(task)
        with torch.device("meta"):
            build_model(task, "mup", source)
            build_model(task, "sp", source)


class _FakeSource:
    """The attributes models are sized by, as the real data modules of each family have them."""

    def __init__(self, task: Task) -> None:
        size = task.family.data_kwargs.get("image_size", 8)
        self.input_shape = (1, size, size)
        self.num_classes = 10
        self.vocab_size = task.family.data_kwargs.get("vocab_size", 256)
        self.seq_len = task.family.data_kwargs.get("seq_len", 16)


def test_width_suite_matches_the_issue() -> None:
    cpu = load_suite("width", "cpu")
    widths = {f.name: sorted(t.width for t in cpu.tasks() if t.family.name == f.name) for f in cpu.families()}
    # cpu: up to 16x the CPU recipes' largest meta-training width, 300 steps (a 2-core budget)
    assert widths["mlp_fashion_mnist"] == [128, 256, 512, 1024, 2048]
    assert widths["vit_fashion_mnist_small"] == widths["lm_brown_small"] == [64, 256]
    assert {t.steps for t in cpu.tasks()} == {300}
    full = load_suite("width", "full")
    assert max(t.width for t in full.tasks() if t.family.model == "mlp") == 8192
    assert full.groups[0].horizons == (1000, 3000, 5000)


def test_ci_suite_has_every_kind() -> None:
    assert [g.kind for g in load_suite("ci", "cpu").groups] == ["width", "depth", "horizon", "diverse"]


def test_a_suite_from_a_path_with_its_own_families(tiny_suite: Path) -> None:
    suite = load_suite(str(tiny_suite), "cpu")
    assert [t.id for t in suite.tasks()] == ["mlp_tiny-w16-d3-t20", "mlp_tiny-w32-d3-t20"]
    assert suite.meta_unroll == suites.META_UNROLL and suite.groups[0].horizons == (20,)


@pytest.mark.parametrize(
    ("name", "size", "message"),
    [
        ("nope", "cpu", "unknown suite 'nope'; known: ci, depth, diverse, horizon, width"),
        ("missing.yaml", "cpu", "does not exist"),
        ("width", "gpu", "--size: expected one of cpu, full"),
    ],
)
def test_unknown_suite_or_size(name: str, size: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_suite(name, size)


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ([{"kind": "breadth", "steps": 10, "tasks": [{"family": "mlp_tiny"}]}], "kind must be one of"),
        ([{"kind": "width", "steps": 10, "tasks": [{"family": "mlp_huge"}]}], "unknown family 'mlp_huge'; known at this size: .*mlp_tiny"),
        ([{"kind": "width", "steps": 10, "tasks": [{"family": "mlp_tiny", "width": 8}]}], "unknown keys \\['width'\\]"),
        ([{"kind": "width", "steps": 0, "tasks": [{"family": "mlp_tiny"}]}], "steps must be a positive integer"),
        ([{"kind": "width", "steps": 10, "horizons": [20], "tasks": [{"family": "mlp_tiny"}]}], "horizon 20 is longer"),
        ([{"kind": "width", "steps": 10, "tasks": []}], "no tasks"),
        ([], "no groups"),
    ],
)
def test_malformed_suites_name_the_problem(tmp_path: Path, write_suite: Callable[..., Path], groups: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_suite(str(write_suite(tmp_path / "bad.yaml", groups)), "cpu")


def test_a_suite_without_the_size(tiny_suite: Path) -> None:
    with pytest.raises(ValueError, match="has sizes \\['cpu'\\], not 'full'"):
        load_suite(str(tiny_suite), "full")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model": "rnn", "data": "digits", "batch_size": 8, "base_width": 8}, "unknown model 'rnn'"),
        ({"model": "mlp", "data": "digits", "batch_size": 8}, "missing \\['base_width'\\]"),
        ({"model": "mlp", "data": "digits", "batch_size": 0, "base_width": 8}, "batch_size must be a positive integer"),
        ({"model": "mlp", "data": "digits", "batch_size": 8, "base_width": 8, "lr": 1}, "unknown keys \\['lr'\\]"),
    ],
)
def test_bad_families(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Family.from_dict("f", config)


def test_width_not_a_multiple_of_the_head_size() -> None:
    family = Family.from_dict("v", {"model": "vit", "data": "digits", "batch_size": 8, "base_width": 16, "head_dim": 8})
    with pytest.raises(ValueError, match="not a multiple of head_dim 8"):
        build_model(Task(family, 20, 2, 10), "mup", _FakeSource(Task(family, 20, 2, 10)))
