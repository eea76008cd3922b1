"""Weight-loading errors name the file, what is wrong and what to do."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from lightning_lopt.optim.architectures import CeloLOpt, SmallFCLOpt
from lightning_lopt.optim.pretrained import from_pretrained, save_pretrained


@pytest.fixture
def offline_hub(monkeypatch):
    calls = []

    def offline(repo_id, **kwargs):
        calls.append(repo_id)
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    return calls


def test_a_missing_relative_directory_is_no_hub_lookup(tmp_path, monkeypatch, offline_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'runs/does-not-exist': no such directory \(.*runs/does-not-exist\)"):
        from_pretrained("runs/does-not-exist")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        from_pretrained("./my-run")
    assert offline_hub == []


def test_an_unreachable_hub_also_says_there_is_no_such_directory(tmp_path, monkeypatch, offline_hub):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConnectionError, match=r"'someone/mulo': no such directory .*unreachable"):
        from_pretrained("someone/mulo")
    assert offline_hub == ["someone/mulo"]


def test_a_card_that_does_not_fit_its_architecture_names_the_card(tmp_path):
    save_pretrained(SmallFCLOpt(), tmp_path)
    card = json.loads((tmp_path / "card.json").read_text())
    (tmp_path / "card.json").write_text(json.dumps({**card, "architecture": CeloLOpt.architecture}))
    with pytest.raises(ValueError, match=r"card\.json: its config does not fit architecture .*exp_mult.*save_pretrained"):
        from_pretrained(tmp_path)


def test_a_malformed_card_names_the_file_and_the_position(tmp_path):
    save_pretrained(SmallFCLOpt(), tmp_path)
    (tmp_path / "card.json").write_text('{"architecture": "small_fc",\n  "config": {')
    with pytest.raises(ValueError, match=r"card\.json: not valid JSON \(.*line 2.*\); restore it"):
        from_pretrained(tmp_path)
