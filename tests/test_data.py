"""Corpora, tokenizers and batches: the embedded Shakespeare text, local files and the real Qwen tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_settings
from mup_qwen.data import (
    DataError,
    get_tokenizer,
    load_corpus,
    qwen_tokenizer_path,
    shakespeare_files,
    train_batches,
    val_batches,
)
from mup_qwen.model import build_model
from mup_qwen.settings import DataSettings
from mup_qwen.train import lm_loss


def test_shakespeare_corpus_is_complete():
    files = shakespeare_files()
    assert len(files) == 42
    assert sum(f.stat().st_size for f in files) > 4_900_000
    corpus = load_corpus(DataSettings())
    assert corpus.vocab_size == 256
    total = len(corpus.train) + len(corpus.val)
    assert len(corpus.val) / total == pytest.approx(0.05, abs=0.001)
    assert int(corpus.train.max()) < 256


def test_validation_text_is_held_out():
    corpus = load_corpus(DataSettings())
    hamlet = next(f for f in shakespeare_files() if f.name == "hamlet_gut.txt").read_bytes()
    tail = hamlet[-2000:-1000]
    head = hamlet[1000:2000]
    val_bytes = bytes(corpus.val.to(torch.uint8).tolist())
    train_bytes = bytes(corpus.train.to(torch.uint8).tolist())
    assert tail in val_bytes
    assert tail not in train_bytes
    assert head in train_bytes


def test_batches_deterministic_from_seed():
    corpus = load_corpus(DataSettings())
    first = next(train_batches(corpus, 4, 32, seed=7))
    again = next(train_batches(corpus, 4, 32, seed=7))
    other = next(train_batches(corpus, 4, 32, seed=8))
    assert first.shape == (4, 33)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert all(torch.equal(a, b) for a, b in zip(val_batches(corpus, 4, 32, 3), val_batches(corpus, 4, 32, 3)))


def test_local_text_files(tmp_path: Path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 50)
    (folder / "b.txt").write_text("Pack my box with five dozen liquor jugs. " * 50)
    for path in (str(folder), str(folder / "*.txt")):
        corpus = load_corpus(DataSettings(source="files", path=path, seq_len=16))
        assert corpus.name == path
        assert len(corpus.train) + len(corpus.val) == 45 * 50 + 41 * 50


def test_missing_local_files(tmp_path: Path):
    with pytest.raises(DataError, match="matches no text file"):
        load_corpus(DataSettings(source="files", path=str(tmp_path / "none*.txt")))


def test_real_qwen_tokenizer_offline(tmp_path: Path):
    path = qwen_tokenizer_path()
    assert path is not None and (path / "tokenizer.json").is_file()
    tokenizer = get_tokenizer(str(path))
    assert tokenizer.tokenizer.init_kwargs.get("local_files_only", True)
    assert tokenizer.vocab_size == 151669
    ids = tokenizer.encode("To be, or not to be, that is the question")
    assert tokenizer.decode(ids) == "To be, or not to be, that is the question"
    assert get_tokenizer("qwen").vocab_size == tokenizer.vocab_size

    text = tmp_path / "play.txt"
    text.write_text(shakespeare_files()[0].read_text()[:20000])
    settings = tiny_settings(tmp_path, data={"source": "files", "path": str(text), "tokenizer": "qwen"})
    corpus = load_corpus(settings.data)
    assert corpus.vocab_size == 151669
    model = build_model(settings, 32, "sp", vocab_size=corpus.vocab_size)
    loss = lm_loss(model, next(train_batches(corpus, 2, 32, seed=0)))
    assert loss.item() == pytest.approx(torch.log(torch.tensor(151669.0)).item(), rel=0.05)


def test_unknown_tokenizer_name(tmp_path: Path):
    with pytest.raises(DataError, match="could not be loaded"):
        get_tokenizer(str(tmp_path / "no_such_tokenizer"))
