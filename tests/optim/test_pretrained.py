"""Weight files: safetensors + card round trips, pickle refusal, shape checks, hub errors."""

from __future__ import annotations

import json
import pickle

import huggingface_hub
import pytest
import safetensors.torch
import torch
from huggingface_hub.errors import LocalEntryNotFoundError

from lightning_lopt.optim import pretrained
from lightning_lopt.optim.architectures import CeloLOpt, SmallFCLOpt, VeLOLOpt
from lightning_lopt.optim.pretrained import from_pretrained, save_pretrained

MODULES = {
    "small_fc": lambda: SmallFCLOpt(step_mult=0.001),
    "celo": lambda: CeloLOpt(lstm_hidden_size=8, train_phase=1),
    "velo": lambda: VeLOLOpt.mu(lstm_hidden_size=8, param_inits=4),
}


@pytest.mark.parametrize("name", MODULES)
def test_round_trip(tmp_path, name):
    module = MODULES[name]()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))
    out = save_pretrained(
        module,
        tmp_path / "lo",
        recipe={"outer_steps": 5},
        meta_training_steps=5,
        data="digits",
        tasks=["mlp-w8"],
    )
    assert sorted(x.name for x in out.iterdir()) == ["card.json", "model.safetensors"]
    card = json.loads((out / "card.json").read_text())
    assert card["architecture"] == module.architecture
    assert card["config"] == module.config
    assert card["recipe"] == {"outer_steps": 5} and card["meta_training_steps"] == 5
    assert card["data"] == "digits" and card["tasks"] == ["mlp-w8"]
    assert card["num_meta_params"] == module.num_meta_params()
    assert card["commit"] is None or len(card["commit"]) == 40
    for source in (out, out / "model.safetensors"):
        loaded = from_pretrained(source)
        assert type(loaded) is type(module) and loaded.config == module.config
        assert loaded.card["tasks"] == ["mlp-w8"]
        for k, v in module.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k


def test_methods_and_class_check(tmp_path):
    module = SmallFCLOpt()
    module.save_pretrained(tmp_path / "lo")
    assert isinstance(SmallFCLOpt.from_pretrained(tmp_path / "lo"), SmallFCLOpt)
    with pytest.raises(TypeError, match="small_fc_lopt"):
        CeloLOpt.from_pretrained(tmp_path / "lo")


def test_card_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_pretrained(SmallFCLOpt(), tmp_path, recipe={"lr": object()})


class _Payload:
    """Unpickling this would create a marker file: the refusal must happen before that."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickles_are_refused_unexecuted(tmp_path):
    save_pretrained(SmallFCLOpt(), tmp_path)
    marker = tmp_path / "executed"
    for name in ("model.pt", "model.bin"):
        torch.save(SmallFCLOpt().state_dict(), tmp_path / name)
        with pytest.raises(ValueError, match="pickle"):
            from_pretrained(tmp_path / name)
    # Pickle content under the safetensors name.
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="not a safetensors file"):
        from_pretrained(tmp_path)
    # A torch.save zip archive under the safetensors name.
    torch.save({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="pickle"):
        from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage garbage!")
    with pytest.raises(ValueError, match="not a safetensors file"):
        from_pretrained(tmp_path)
    assert not marker.exists()


def test_directory_with_only_a_pickle(tmp_path):
    torch.save(SmallFCLOpt().state_dict(), tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="never loaded"):
        from_pretrained(tmp_path)


def _rewrite(directory, edit):
    tensors = safetensors.torch.load_file(str(directory / "model.safetensors"))
    edit(tensors)
    safetensors.torch.save_file(tensors, str(directory / "model.safetensors"))


def test_mismatched_tensors_are_named(tmp_path):
    save_pretrained(SmallFCLOpt(), tmp_path)
    _rewrite(tmp_path, lambda t: t.__setitem__("mlp.1.weight", torch.zeros(32, 31)))
    with pytest.raises(ValueError, match=r"'mlp.1.weight' has shape \[32, 31\].*expects \[32, 32\]"):
        from_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("rms_decays"))
    with pytest.raises(ValueError, match=r"missing \['rms_decays'\]"):
        from_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.update(rms_decays=torch.zeros(1), mlp_extra=torch.zeros(2)))
    with pytest.raises(ValueError, match=r"extra \['mlp_extra'\]"):
        from_pretrained(tmp_path)


def test_unknown_architecture(tmp_path):
    save_pretrained(SmallFCLOpt(), tmp_path)
    card = json.loads((tmp_path / "card.json").read_text())
    (tmp_path / "card.json").write_text(json.dumps({**card, "architecture": "adam"}))
    with pytest.raises(ValueError, match="unknown architecture 'adam'"):
        from_pretrained(tmp_path)


def test_packaged_names(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "PACKAGED_DIR", tmp_path)
    assert pretrained.available() == []
    with pytest.raises(FileNotFoundError, match="none packaged yet"):
        from_pretrained("mulo-m")
    save_pretrained(SmallFCLOpt(), tmp_path / "mulo-s")
    assert pretrained.available() == ["mulo-s"]
    assert isinstance(from_pretrained("mulo-s"), SmallFCLOpt)
    with pytest.raises(FileNotFoundError, match=r"available: \['mulo-s'\]"):
        from_pretrained("mulo-m")


def test_offline_hub_error(monkeypatch):
    calls = []

    def offline(repo_id, **kwargs):
        calls.append(kwargs)
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConnectionError, match="unreachable.*offline"):
        from_pretrained("someone/mulo")
    assert calls and calls[0]["etag_timeout"] <= 10
    assert calls[0]["allow_patterns"] == ["model.safetensors", "card.json"]


def test_hub_download_is_loaded(tmp_path, monkeypatch):
    save_pretrained(CeloLOpt(lstm_hidden_size=4), tmp_path / "snap")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path / "snap"))
    assert isinstance(from_pretrained("someone/celo"), CeloLOpt)


def test_locate_follows_the_lookup_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "lo-fmnist8-w32-128"
    local.mkdir()
    assert pretrained.locate(str(local)) == local
    assert pretrained.locate("lo-fmnist8-w32-128").resolve() == local  # a local directory wins over the packaged name
    local.rmdir()
    assert pretrained.locate("lo-fmnist8-w32-128") == pretrained.PACKAGED_DIR / "lo-fmnist8-w32-128"
    assert pretrained.locate("someone/weights") == "someone/weights"
    with pytest.raises(FileNotFoundError, match="not a packaged learned optimizer"):
        pretrained.locate("no-such-weights")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        pretrained.locate("./runs/missing")


def test_pretrained_imports_no_architecture_and_still_builds_every_one():
    import ast
    import subprocess
    import sys

    tree = ast.parse(open(pretrained.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not {"lightning_lopt.optim.architectures", "lightning_lopt.optim.celo2_lopt"} & imported
    code = (
        "from lightning_lopt.optim.pretrained import from_pretrained; "
        "print(sorted(type(from_pretrained(n)).__name__ for n in ('lo-fmnist8-w32-128', 'celo-8x8-mlp-w32', 'celo2-8x8-mlp-w32')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['Celo2LOpt', 'CeloLOpt', 'SmallFCLOpt']"
