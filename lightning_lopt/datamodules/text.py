"""Language-modelling data: local text files, a Hugging Face dataset, or the Brown corpus.

Batches are ``(x, y)``, both int64 ``[B, T]`` with ``T = seq_len`` and ``y`` = ``x`` shifted by one
token. Documents are split (seeded) into train / validation / test; each split's documents are then
concatenated into one token stream (separated by a blank line) and cut into windows.

Where the text comes from (exactly one of):

- ``files``: paths of text files (UTF-8), or directories, from which every ``*.txt`` file below is
  read. Each file is a document, except that a single file is split at blank lines into paragraphs,
  so that one file still gives a split *by document*.
- ``dataset``: a Hugging Face ``datasets`` name or local path, read with ``load_dataset(dataset,
  dataset_config, split="train")``; each row's ``text_field`` is a document (empty rows dropped).
  The hub needs a network; offline, this fails with an error saying so.
- neither: the Brown corpus (500 documents, about 6.1 MB of text once its part-of-speech tags are
  stripped), looked for in ``root``, ``root/brown`` and ``<data dir>/brown``; installed by
  ``python -m lightning_lopt.datamodules.fetch --only brown``.

Tokenizers: ``"byte"`` (UTF-8 bytes, ``vocab_size`` 256, no training), or ``"bpe"``: a byte-level
BPE trained offline with ``tokenizers`` on the training documents only (``vocab_size`` default 4096;
about 7 s on Brown with 2 cores).

Usage::

    from lightning_lopt.datamodules import TextDataModule
    dm = TextDataModule(seq_len=128, batch_size=32)                 # Brown, byte-level
    dm = TextDataModule(files="notes.txt", tokenizer="bpe", vocab_size=512)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))                         # [32, 128] int64 each
    xs, ys = dm.sample(batch_size=32, n=4, generator=torch.Generator().manual_seed(0))  # [4, 32, 128]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_lopt.datamodules import paths
from lightning_lopt.datamodules.base import (
    CachedDataModule,
    Split,
    check_fraction,
    check_fractions_sum,
    check_positive_int,
    sample_indices,
    seeded_split,
)
from lightning_lopt.datamodules.formats import brown_files, read_brown_document

TOKENIZERS = ("byte", "bpe")
DEFAULT_BPE_VOCAB = 4096
DOC_SEPARATOR = "\n\n"


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


class TextDataModule(CachedDataModule):
    """Windows of ``seq_len`` tokens for next-token prediction (see the module docstring).

    Args:
        files: text file paths or directories (every ``*.txt`` below), or ``None``.
        dataset: a Hugging Face dataset name (or local path) for ``datasets.load_dataset``, or ``None``.
        dataset_config: the dataset's configuration name, if it has several.
        text_field: the column holding the text in ``dataset``.
        root: where to look for the Brown corpus first (used when neither ``files`` nor ``dataset``).
        tokenizer: ``"byte"`` or ``"bpe"``.
        vocab_size: BPE vocabulary size (default 4096, must exceed 256); must be ``None`` or 256 for
            bytes. :attr:`vocab_size` is this requested size: a small corpus may learn fewer tokens,
            but every id stays below it, so an embedding of this size is always valid.
        seq_len: tokens per example, ``T``.
        val_fraction: fraction of documents for validation, in (0, 1).
        test_fraction: fraction of documents for test, in [0, 1); 0 makes the test split the
            validation split.
        batch_size: dataloader batch size.
        seed: seeds the document split and the shuffling.
        num_workers: dataloader workers (0: the data is already in memory).
        device: where the cached tensors live.
    """

    def __init__(
        self,
        files: str | Path | Sequence[str | Path] | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        text_field: str = "text",
        root: str | Path | None = None,
        tokenizer: str = "byte",
        vocab_size: int | None = None,
        seq_len: int = 128,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
        device: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers, device=device)
        if files is not None and dataset is not None:
            raise ValueError("pass either files or dataset, not both")
        if isinstance(files, (str, Path)):
            files = [files]
        self.files = [Path(f).expanduser() for f in files] if files is not None else None
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.text_field = text_field
        self.root = Path(root).expanduser() if root is not None else None
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
        self.tokenizer_name = tokenizer
        if tokenizer == "byte":
            if vocab_size not in (None, 256):
                raise ValueError(f"vocab_size must be None or 256 for the byte tokenizer, got {vocab_size!r}")
            self.vocab_size = 256
        else:
            vocab_size = DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size
            if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 256:
                raise ValueError(f"vocab_size must be an integer > 256 for BPE, got {vocab_size!r}")
            self.vocab_size = vocab_size
        self.seq_len = check_positive_int("seq_len", seq_len)
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        self.test_fraction = check_fraction("test_fraction", test_fraction, allow_zero=True)
        check_fractions_sum(self.val_fraction, self.test_fraction)
        self.input_shape = (seq_len,)
        self._bpe: Any = None  # a tokenizers.ByteLevelBPETokenizer once trained
        self._train_tokens: Tensor | None = None
        self.save_hyperparameters()

    # -- reading documents -------------------------------------------------------------------------

    def brown_search_dirs(self) -> list[Path]:
        """Where the Brown corpus is looked for, in order."""
        dirs = [self.root, self.root / paths.BROWN.subdir] if self.root is not None else []
        return [*dirs, paths.default_data_dir() / paths.BROWN.subdir]

    def documents(self) -> list[str]:
        """All documents of the configured source, in a fixed order, before any split."""
        if self.dataset is not None:
            return self._hf_documents()
        if self.files is not None:
            return self._file_documents()
        for d in self.brown_search_dirs():
            found = brown_files(d)
            if found:
                return [read_brown_document(p) for p in found]
        hint = "\nOr pass files=... (local text files) or dataset=... (Hugging Face, needs a network)."
        raise FileNotFoundError(paths.missing_data_message(paths.BROWN, self.brown_search_dirs(), hint))

    def _file_documents(self) -> list[str]:
        assert self.files is not None
        found: list[Path] = []
        for f in self.files:
            if f.is_dir():
                found += sorted(p for p in f.rglob("*.txt") if p.is_file())
            elif f.is_file():
                found.append(f)
            else:
                raise FileNotFoundError(f"files: {f} does not exist")
        if not found:
            raise FileNotFoundError(f"files: no *.txt file under {[str(f) for f in self.files]}")
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in found]
        if len(texts) == 1:
            return _paragraphs(texts[0])
        return [t for t in texts if t.strip()]

    def _hf_documents(self) -> list[str]:
        import datasets  # imported here: slow to import, and only this source needs it

        try:
            ds = datasets.load_dataset(self.dataset, self.dataset_config, split="train")
        except Exception as err:  # ConnectionError offline, DatasetNotFoundError, ValueError, ...
            raise FileNotFoundError(
                f"could not load the Hugging Face dataset {self.dataset!r} "
                f"(config {self.dataset_config!r}): {type(err).__name__}: {err}\n"
                "The hub needs a network. Offline, pass files=... (local text files), a local path "
                f"that datasets can read, or use the Brown corpus ({paths.FETCH_MODULE} --only brown)."
            ) from err
        if self.text_field not in ds.column_names:
            raise ValueError(f"text_field={self.text_field!r} is not a column of {self.dataset!r}: {ds.column_names}")
        return [t for t in ds[self.text_field][:] if t and t.strip()]

    # -- tokenizing --------------------------------------------------------------------------------

    def _train_bpe(self, docs: list[str]) -> None:
        from tokenizers import ByteLevelBPETokenizer  # imported here: only BPE needs it

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(docs, vocab_size=self.vocab_size, min_frequency=2, show_progress=False)
        self._bpe = bpe

    def encode(self, text: str) -> Tensor:
        """Token ids (int64, 1-D, CPU) of ``text``. BPE needs :meth:`setup` first (it trains there)."""
        if self.tokenizer_name == "byte":
            data = bytearray(text.encode("utf-8"))
            # torch.frombuffer rejects an empty buffer.
            return torch.frombuffer(data, dtype=torch.uint8).long() if data else torch.zeros(0, dtype=torch.long)
        if self._bpe is None:
            raise RuntimeError("the BPE tokenizer is trained in setup(); call dm.setup() first")
        return torch.tensor(self._bpe.encode(text).ids, dtype=torch.long)

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """The text of token ids (invalid UTF-8 is replaced, e.g. a byte window cut mid-character)."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if self.tokenizer_name == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        if self._bpe is None:
            raise RuntimeError("the BPE tokenizer is trained in setup(); call dm.setup() first")
        return self._bpe.decode(ids)

    def _stream(self, docs: list[str]) -> Tensor:
        """One int64 token stream: the documents joined by a blank line."""
        if self.tokenizer_name == "byte":
            return self.encode(DOC_SEPARATOR.join(docs))
        # encode_batch tokenizes the documents in parallel (one 6 MB string would use one core).
        sep = self._bpe.encode(DOC_SEPARATOR).ids
        ids: list[int] = []
        for i, enc in enumerate(self._bpe.encode_batch(docs)):
            ids += (sep if i else []) + enc.ids
        return torch.tensor(ids, dtype=torch.long)

    # -- splits ------------------------------------------------------------------------------------

    def _build_splits(self) -> dict[str, Split]:
        docs = self.documents()
        fractions = {"val": self.val_fraction, "test": self.test_fraction}
        try:
            idx = seeded_split(len(docs), fractions, self.seed)
        except ValueError as err:
            raise ValueError(f"{err} (the text has {len(docs)} documents)") from err
        split_docs = {k: [docs[i] for i in v.tolist()] for k, v in idx.items()}
        if self.test_fraction == 0:
            split_docs["test"] = split_docs["val"]
        if self.tokenizer_name == "bpe":
            self._train_bpe(split_docs["train"])  # on training text only: no peek at val/test
        streams = {k: self._stream(v) for k, v in split_docs.items()}
        self._train_tokens = streams["train"]
        # Too short for two blocks of starts leaves sample() nothing to draw from; catch it here.
        if streams["train"].numel() < 2 * self.seq_len:
            raise ValueError(f"seq_len={self.seq_len} is too long for the {streams['train'].numel()} training tokens")
        return {k: self._windows(s, k) for k, s in streams.items()}

    def _windows(self, stream: Tensor, name: str) -> Split:
        """Non-overlapping ``(x, y)`` windows covering ``stream`` (views: no copy on the CPU)."""
        t = self.seq_len
        m = (stream.numel() - 1) // t
        if m < 1:
            raise ValueError(
                f"the {name} split has {stream.numel()} tokens, fewer than seq_len + 1 = {t + 1}; "
                f"lower seq_len or raise the fraction"
            )
        return stream[: m * t].view(m, t), stream[1 : m * t + 1].view(m, t)

    def setup(self, stage: str | None = None) -> None:
        """Read, split and tokenize (once; BPE is trained here), then cache on :attr:`device`."""
        super().setup(stage)
        assert self._train_tokens is not None
        self._train_tokens = self._train_tokens.to(self.device)

    @property
    def train_tokens(self) -> Tensor:
        """The training split as one int64 token stream (what :meth:`sample` draws windows from)."""
        self.setup()
        assert self._train_tokens is not None
        return self._train_tokens

    def to(self, device: str | torch.device) -> TextDataModule:
        """Move the cached tensors (now, or at :meth:`setup`) to ``device``; returns ``self``."""
        super().to(device)
        if self._train_tokens is not None:
            self._train_tokens = self._train_tokens.to(self.device)
        return self

    def sample(self, batch_size: int, n: int, generator: torch.Generator) -> Split:
        """``n`` batches of random training windows: ``x`` and ``y`` are int64 ``[n, batch_size, T]``.

        Windows start anywhere in the training stream, not only at multiples of ``T``, so repeated
        draws see every offset. Starts are distinct within a batch: the stream is cut into blocks of
        ``T`` tokens, each batch picks ``batch_size`` distinct blocks (as in
        :func:`~lightning_lopt.datamodules.base.sample_indices`) and a random offset inside each.
        """
        tokens = self.train_tokens
        t = self.seq_len
        # Block c covers starts c*t .. c*t + t - 1; the last start needs t + 1 tokens after it.
        blocks = tokens.numel() // t - 1
        block = sample_indices(blocks, batch_size, n, generator)
        offset = torch.randint(0, t, block.shape, generator=generator, device=generator.device)
        starts = (block * t + offset).to(tokens.device)
        windows = tokens[starts.unsqueeze(-1) + torch.arange(t + 1, device=tokens.device)]
        return windows[..., :-1], windows[..., 1:]
