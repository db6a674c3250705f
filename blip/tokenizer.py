"""BLIP tokenizer: `BertTokenizerFast` (bert-base-uncased layout) with `[DEC]` and `[ENC]` added.

`build_tokenizer` does what the original `init_tokenizer` does: `[DEC]` becomes the bos token and `[ENC]` an additional
special token, so on the 30522-line bert-base-uncased vocab they get ids 30522 and 30523 (on any other vocabulary:
the next two ids, unless the vocab already has them). `write_vocab` writes an offline vocab with the bert layout (the
real special-token ids) or a small one, for tests and demos, since nothing can be downloaded.
Tokenization itself is always done by the `tokenizers` library, never by hand.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from transformers import BertTokenizer, BertTokenizerFast, PreTrainedTokenizerBase

BERT_VOCAB_SIZE = 30522
DEC_TOKEN = "[DEC]"
ENC_TOKEN = "[ENC]"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")

# Common English words for the offline vocab: enough to write captions and web-like alt-text.
COMMON_WORDS = """
a an the of in on at to for with by from and or but not no is are was were be been being has have had do does did
this that these those there here it its they them their he she his her him we us our you your i my me who what which
where when why how all any some many much more most few one two three four five six seven eight nine ten several
picture photo image photograph view close up down out over under above below near next behind front left right top
bottom middle center side inside outside into onto through around between against along across back other another
man woman men women person people child children boy girl baby kid kids group family couple crowd player team
dog dogs cat cats bird birds horse horses cow cows sheep elephant giraffe zebra bear animal animals fish
car cars truck bus train plane airplane boat bike bicycle motorcycle street road sidewalk building house city
table chair couch bed room kitchen bathroom window door wall floor desk computer laptop phone book clock vase
food pizza cake plate bowl cup glass bottle sandwich fruit banana apple orange broccoli hot meal water coffee
tree trees grass field park beach ocean sea sky sun snow mountain hill river lake forest flowers flower garden
sitting standing walking running riding playing holding eating looking lying flying parked sits stands walks
runs rides plays holds eats looks lies flies wearing carrying talking watching waiting taking smiling
red orange yellow green blue purple pink brown black white gray grey dark light bright colorful colored
big small large little tiny huge tall short long wide round square flat empty full old new young
circle circles triangle triangles rectangle rectangles star stars shape shapes line lines dot dots ring
background foreground corner edge pattern texture color colour colors
very just only also then than so as if each every both either same different good great nice best
day night morning evening sunset time year years today new free sale buy shop online click home page
best top cheap price best quality high low stock photo stock vector illustration design logo icon
"""

# Word pieces, so unseen words still tokenize into something other than [UNK].
COMMON_SUFFIXES = "s es ed ing er ers est ly y ion ions ness ment ful less able al ic ish ous ive"


def _pretokens(word: str) -> list[str]:
    """Split like BERT's pre-tokenizer (whitespace + punctuation), lowercased."""
    return re.findall(r"\w+|[^\w\s]", word.lower())


def write_vocab(directory: str | Path, extra_words: Iterable[str] = (), pad_to_bert: bool = True) -> Path:
    """Write a vocab.txt + tokenizer files into `directory`; return it.

    `pad_to_bert=True`: 30522 lines in the bert-base-uncased layout, so the special ids are the released checkpoints'
    ([PAD] 0, [unused0..98] 1-99, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, [unused99..] up to 998, then single
    characters, words (common English + `extra_words`), `##` pieces, and `[unusedN]` filler up to 30522 lines; the
    filler is never matched: the pre-tokenizer splits on brackets).
    `pad_to_bert=False`: a small vocabulary of just those tokens, [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4 first;
    [DEC] and [ENC] then get the ids len(vocab) and len(vocab) + 1 (a model built on it is that much smaller).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if pad_to_bert:
        head = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        head += [f"[unused{i}]" for i in range(99, 99 + 999 - len(head))]  # ids 104..998
    else:
        head = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]  # punctuation, digits, a-z
    words = COMMON_WORDS.split() + [p for w in extra_words for p in _pretokens(str(w))]
    pieces = ["##" + c for c in chars if c.isalnum()] + ["##" + s for s in COMMON_SUFFIXES.split()]
    vocab = list(dict.fromkeys(head + chars + words + pieces))  # dedupe, keep first occurrence
    if len(vocab) > BERT_VOCAB_SIZE:
        raise ValueError(f"vocab has {len(vocab)} entries, more than the {BERT_VOCAB_SIZE} of bert-base-uncased")
    n = 999
    while pad_to_bert and len(vocab) < BERT_VOCAB_SIZE:
        vocab.append(f"[unused{n}]")
        n += 1
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    build_tokenizer(directory / "vocab.txt").save_pretrained(directory)
    return directory


def build_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Tokenizer from a folder (tokenizer files or a vocab.txt) or from a vocab.txt file, with [DEC]/[ENC] added."""
    path = Path(path)
    if path.is_dir():
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise FileNotFoundError(f"no tokenizer in {path}: expected one of {', '.join(_TOKENIZER_FILES)}")
        tok = BertTokenizerFast.from_pretrained(str(path))
        expected = _count_lines(path / "vocab.txt") if (path / "vocab.txt").is_file() else None
    elif path.is_file():
        # BertTokenizerFast(vocab_file=...) silently ignores the file in transformers 5.x; `vocab=` reads it
        tok = BertTokenizer(vocab=str(path))
        expected = _count_lines(path)
    else:
        raise FileNotFoundError(f"tokenizer path {path} does not exist (expected a folder or a vocab.txt)")
    if expected is not None and tok.vocab_size != expected:
        raise ValueError(f"tokenizer from {path} has {tok.vocab_size} tokens but vocab.txt has {expected} lines")
    # BertTokenizer appends missing special tokens as "added" tokens; a BERT vocab has them in the vocab itself
    base = tok.backend_tokenizer.get_vocab(with_added_tokens=False)
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in base]
    if missing:
        raise ValueError(f"tokenizer from {path} is not a BERT vocab: {', '.join(missing)} missing")
    # exactly the original BLIP init_tokenizer: [DEC] as bos, [ENC] as an additional special token
    tok.add_special_tokens({"bos_token": DEC_TOKEN})
    tok.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    tok.enc_token_id = tok.convert_tokens_to_ids(ENC_TOKEN)
    return tok


def _count_lines(path: Path) -> int:
    # vocab.txt: one token per line; a trailing newline does not add a token
    return len(path.read_text(encoding="utf-8").splitlines())
