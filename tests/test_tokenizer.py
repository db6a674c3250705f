from __future__ import annotations

from pathlib import Path

import pytest

from blip.tokenizer import BERT_VOCAB_SIZE, build_tokenizer, write_vocab


def test_vocab_layout_matches_bert_base_uncased(tiny_vocab_dir: Path) -> None:
    lines = (tiny_vocab_dir / "vocab.txt").read_text().splitlines()
    assert len(lines) == BERT_VOCAB_SIZE
    assert len(set(lines)) == len(lines)
    assert [lines[i] for i in (0, 100, 101, 102, 103)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.mark.parametrize("source", ["folder", "vocab_file"])
def test_special_ids_as_original_init_tokenizer(tiny_vocab_dir: Path, source: str) -> None:
    tok = build_tokenizer(tiny_vocab_dir if source == "folder" else tiny_vocab_dir / "vocab.txt")
    assert len(tok) == 30524
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 100, 101, 102)
    assert tok.bos_token == "[DEC]" and tok.bos_token_id == 30522
    assert tok.enc_token_id == 30523 == tok.convert_tokens_to_ids("[ENC]")


def test_tokenizes_words_not_unk(tiny_vocab_dir: Path) -> None:
    tok = build_tokenizer(tiny_vocab_dir)
    ids = tok("A picture of a red dog.").input_ids
    assert ids[0] == 101 and ids[-1] == 102
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a picture of a red dog."
    # unknown words fall back to ## pieces, never to [UNK]
    assert tok.unk_token_id not in tok("xylophone").input_ids
    # [DEC]/[ENC] are single special tokens and are dropped by skip_special_tokens
    ids = tok("[DEC] a dog").input_ids
    assert ids[1] == 30522 and tok.decode(ids, skip_special_tokens=True) == "a dog"


def test_extra_words_become_whole_tokens(tmp_path: Path) -> None:
    tok = build_tokenizer(write_vocab(tmp_path, ["Hexagon", "zigzag-stripes"]))
    for word in ("hexagon", "zigzag", "stripes"):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1
    plain = build_tokenizer(write_vocab(tmp_path / "plain"))
    assert len(plain("hexagon", add_special_tokens=False).input_ids) > 1


def test_saved_folder_round_trips(tiny_vocab_dir: Path, tmp_path: Path) -> None:
    tok = build_tokenizer(tiny_vocab_dir)
    tok.save_pretrained(tmp_path)
    again = build_tokenizer(tmp_path)
    text = "two cats sitting on a blue couch"
    assert again(text).input_ids == tok(text).input_ids
    assert again.enc_token_id == 30523 and len(again) == 30524


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        build_tokenizer(tmp_path)
    bad = tmp_path / "vocab.txt"
    bad.write_text("hello\nworld\n")
    with pytest.raises(ValueError, match="not a BERT vocab"):
        build_tokenizer(bad)
    with pytest.raises(ValueError, match="more than"):
        write_vocab(tmp_path / "big", [f"w{i}" for i in range(BERT_VOCAB_SIZE)])
