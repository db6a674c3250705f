"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_vocab_dir(tmp_path_factory: pytest.TempPathFactory):
    """An offline bert-base-uncased-layout tokenizer folder (30522-line vocab.txt + tokenizer files)."""
    from blip.tokenizer import write_vocab

    try:  # the synthetic world's words, once capfilt.synth exists
        from capfilt.synth import VOCAB_WORDS
    except ImportError:
        VOCAB_WORDS = ()
    return write_vocab(tmp_path_factory.mktemp("vocab"), VOCAB_WORDS)
