import pytest
import torch

from lightning_lopt import optim
from lightning_lopt.optim import MuAdam


def _params():
    return [torch.nn.Parameter(torch.randn(3, 3))]


def test_build_known_names_give_the_right_classes():
    assert isinstance(optim.build("adamw", _params()), torch.optim.AdamW)
    assert isinstance(optim.build("SGD", _params()), torch.optim.SGD)
    assert isinstance(optim.build("muadam", _params(), allow_sp=True), MuAdam)
    assert isinstance(optim.build(torch.optim.Adam, _params(), lr=0.1), torch.optim.Adam)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown name 'adamx'.*adamw.*muadam.*sgd"):
        optim.build("adamx", _params())


def test_scales_reach_only_optimizers_that_take_them():
    calls = []

    def scales():
        calls.append(1)
        return {"w": 0.5}

    opt = optim.build("adamw", [("w", _params()[0])], scales=scales, lr=0.1)
    assert calls == [] and opt.param_groups[0]["lr"] == 0.1
    opt = optim.build("muadam", [("w", _params()[0])], scales=scales, lr=0.1)
    assert calls == [1] and opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_register_custom_factory():
    optim.register("my_sgd", lambda params, **kw: torch.optim.SGD(params, lr=0.5, **kw))
    assert optim.build("my_sgd", _params()).param_groups[0]["lr"] == 0.5
    assert "my_sgd" in optim.available()


def test_resolve_accepts_import_paths_and_names_what_fails():
    assert optim.resolve("torch.optim:Adam") is torch.optim.Adam
    assert optim.resolve("torch.optim.Adam") is torch.optim.Adam
    with pytest.raises(ValueError, match="cannot import 'no_such_module:Opt'"):
        optim.resolve("no_such_module:Opt")
    with pytest.raises(ValueError, match="cannot import 'torch.optim:NoSuchOpt'"):
        optim.resolve("torch.optim:NoSuchOpt")
    with pytest.raises(ValueError, match="not a class or callable"):
        optim.resolve("torch.optim:__name__")


def test_every_place_reads_the_learned_optimizer_classes():
    from lightning_lopt.eval.optimizers import parse_optimizer
    from lightning_lopt.meta.catalogue import LOPTS, build_lopt

    names = [cls.registry_name for cls in optim.registry.LEARNED]
    assert len(set(names)) == len(names)
    for cls in optim.registry.LEARNED:
        assert optim.resolve(cls.registry_name) is cls
        assert parse_optimizer(cls.registry_name).param == ("mup" if cls.mu else "sp")
    assert parse_optimizer("muadam").param == "mup" and parse_optimizer("adamw").param == "sp"
    assert sorted(LOPTS) == ["celo", "celo2", "celo2-base", "lo", "mucelo2", "mulo", "muvelo", "velo"]
    module, mu = build_lopt("mulo", stage=None, seed=0)
    assert mu is True and module.step_mult == 0.01
    with pytest.raises(ValueError, match="stage applies to celo only"):
        build_lopt("lo", stage=2, seed=0)


def test_default_lr_is_what_build_would_use():
    assert optim.default_lr("sgd") == 0.1  # the registry's default beats torch's
    assert optim.default_lr("mulo") == 1.0 and optim.default_lr("muadam") == 1e-3
    assert optim.default_lr(torch.optim.Adam) == 1e-3
    assert optim.default_lr(lambda params, lr: None) is None  # no default
    assert optim.default_lr(lambda params: None) is None  # no lr at all
    assert optim.build("sgd", _params()).param_groups[0]["lr"] == optim.default_lr("sgd")
    with pytest.raises(ValueError, match="unknown name 'adamx'"):
        optim.default_lr("adamx")
