"""open_clip's CLIP tokenizer (OpenAI's byte-level BPE, 49408 ids), without torch.

`encode(texts, length)` gives exactly `open_clip.tokenize(texts, context_length=length)`:
each text cleaned as open_clip's default `clean="lower"` does (ftfy.fix_text, html.unescape
twice, whitespace runs collapsed, stripped, lower-cased), split with CLIP's regex, its UTF-8
bytes mapped to printable characters and merged by the BPE ranks; rows are
<start_of_text> (49406), the pieces, <end_of_text> (49407), then zeros. A text too long keeps
its first `length - 2` pieces and ends with <end_of_text>, as open_clip's truncation does.

data.text_len: the models read the first text_len - 1 positions of each row (the last one is
only a captioning target), so text_len=78 feeds a CLIP text tower open_clip's 77-token rows;
exactly so for texts of at most 75 pieces. A longer text's 78-row holds 76 pieces and its
<end_of_text> at position 77, which the model does not read, where open_clip's 77-row holds 75
pieces and <end_of_text>. (open_clip's CoCa reads tokenize(texts, 77)[:, :-1]: text_len=77.)

Id 0 is both open_clip's padding and the piece "!" (open_clip pads with zeros too): the
models here treat id 0 as padding, so a "!" is masked like one, as it is in open_clip's CoCa
loss; CLIP's end-of-text pooling is unaffected.

The vocabulary is open_clip's `bpe_simple_vocab_16e6.txt.gz` (found beside the installed
package's tokenizer.py without importing open_clip or torch), or a file the user names:
`data.tokenizer="clip_bpe"` or `"clip_bpe:/path/to/bpe_simple_vocab_16e6.txt.gz"`. Nothing is
downloaded. A workdir keeps a byte copy of that file (WORKDIR_FILE), which is all
`load_workdir` needs.

The merge loop is open_clip's, written here (with its per-word cache) rather than taken from
Hugging Face `tokenizers`: a `tokenizers` BPE model built from the same merges, behind this
module's cleaning, gave different ids for 117 of the 1300 test texts (tokenizers 0.23): it
splits out a special token written inside a run of punctuation, which open_clip's pattern
leaves to BPE, and its regex engine's Unicode tables disagree with `regex`'s on rarer code
points (e.g. in the U+3xxxx CJK plane). It would also add a compiled dependency and huggingface_hub,
while the text cleaning (ftfy), which it cannot do, costs most of the time anyway.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
from typing import Sequence

import numpy as np
from etils import epath

from mmjax.data.tokenizer import TextTokenizer, pack
from mmjax.errors import UserError

SPEC = "clip_bpe"  # data.tokenizer's value; "clip_bpe:PATH" names the vocabulary file
VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"  # the file open_clip ships beside its tokenizer.py
WORKDIR_FILE = "clip_bpe_vocab.txt.gz"  # the workdir's copy of the vocabulary (mmjax.run_record)
START, END = "<start_of_text>", "<end_of_text>"
# open_clip's SimpleTokenizer pattern: the special tokens, contractions, letter runs, single
# digits, runs of anything else but whitespace (compiled with regex's IGNORECASE, as there).
PATTERN = START + "|" + END + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_NUM_MERGES = 49152 - 256 - 2  # open_clip reads lines 1 .. 48894 of the file
_CACHE_LIMIT = 1 << 20  # words remembered per tokenizer; past it the cache starts over


def is_spec(spec: str) -> bool:
    """True for data.tokenizer values this module reads: "clip_bpe" and "clip_bpe:PATH"."""
    return spec == SPEC or spec.startswith(SPEC + ":")


def vocab_path(spec: str) -> str:
    """The vocabulary file a spec names: PATH for "clip_bpe:PATH", otherwise open_clip's own
    file. UserError (one line, saying where it looked) when there is none."""
    given = spec[len(SPEC) + 1:] if spec.startswith(SPEC + ":") else ""
    if given:
        path = os.path.expanduser(given)
        if not os.path.isfile(path):
            raise UserError(f"CLIP BPE vocabulary {path} not found (data.tokenizer={spec!r}); give the path of open_clip's "
                            f"{VOCAB_NAME}, or data.tokenizer={SPEC!r} to use the installed open_clip's")
        return path
    try:
        found = importlib.util.find_spec("open_clip")  # locates the package without importing it (or torch)
    except (ImportError, ValueError):
        found = None
    folders = list(found.submodule_search_locations or []) if found is not None else []
    for folder in folders:
        path = os.path.join(folder, VOCAB_NAME)
        if os.path.isfile(path):
            return path
    where = " or ".join(os.path.join(folder, VOCAB_NAME) for folder in folders) or "no open_clip package is installed"
    raise UserError(f"CLIP BPE vocabulary not found for data.tokenizer={spec!r} (looked for open_clip's {VOCAB_NAME}: "
                    f"{where}); pip install open_clip_torch, or give data.tokenizer='{SPEC}:/path/to/{VOCAB_NAME}'")


def load(spec: str) -> ClipBPETokenizer:
    """The tokenizer a data.tokenizer value "clip_bpe[:PATH]" names."""
    path = vocab_path(spec)
    return ClipBPETokenizer(_read(path), path)


def load_workdir(workdir: str) -> ClipBPETokenizer:
    """The tokenizer a run kept in its workdir (the copy mmjax.run_record.write made)."""
    path = os.path.join(workdir, WORKDIR_FILE)
    if not epath.Path(path).is_file():
        raise UserError(f"{path} not found: the run's CLIP BPE vocabulary is missing; copy open_clip's {VOCAB_NAME} "
                        "there under that name")
    return ClipBPETokenizer(_read(path), path)


def _read(path: str) -> bytes:
    try:
        return epath.Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"CLIP BPE vocabulary {path} cannot be read ({e.strerror})") from e


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """open_clip's (GPT-2's) table from each byte to a printable character."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clean(text: str) -> str:
    """open_clip's clean="lower": ftfy.fix_text, html.unescape twice, whitespace collapsed, lower case."""
    import ftfy  # open_clip imports it unconditionally; ids differ without it (quotes, widths, NFC)

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


class ClipBPETokenizer(TextTokenizer):
    """open_clip's SimpleTokenizer (clean="lower", no extra special tokens) as a TextTokenizer."""

    pad_id = 0

    def __init__(self, vocab_file: bytes, source: str = "<bytes>"):
        self.vocab_file = vocab_file  # the file's bytes: what a workdir keeps
        try:
            import ftfy  # noqa: F401  (checked here, so a missing package fails at start, not mid-run)
            import regex
        except ImportError as e:
            raise UserError(f"data.tokenizer={SPEC!r} needs the {e.name} package: pip install ftfy regex") from None
        try:
            text = gzip.decompress(vocab_file) if vocab_file[:2] == b"\x1f\x8b" else vocab_file
            lines = text.decode("utf-8").split("\n")
            while lines and not lines[-1].strip():  # a short file's final newline (open_clip's file is longer)
                lines.pop()
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise UserError(f"{source} is not a CLIP BPE vocabulary ({e}); give open_clip's {VOCAB_NAME}") from None
        merges = [tuple(line.split()) for line in lines[1: _NUM_MERGES + 1]]
        if not merges or any(len(m) != 2 for m in merges):
            raise UserError(f"{source} is not a CLIP BPE vocabulary (each line after the first must be a pair of "
                            f"symbols); give open_clip's {VOCAB_NAME}")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        chars = list(self.byte_encoder.values())
        vocab = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges), START, END]
        self.encoder = {piece: i for i, piece in enumerate(vocab)}
        self.decoder = vocab
        self.bpe_ranks = {merge: i for i, merge in enumerate(merges)}
        self.vocab_size = len(vocab)  # 49408 for open_clip's file
        self.bos_id, self.eos_id = self.encoder[START], self.encoder[END]  # 49406, 49407
        self.pattern = regex.compile(PATTERN, regex.IGNORECASE)
        self._clear_cache()

    def _clear_cache(self):
        # Special tokens written in a caption become the special ids, as in open_clip.
        self.cache = {START: (self.bos_id,), END: (self.eos_id,)}

    # Pickled (grain's worker processes) as the file's bytes, rebuilt on the other side.
    def __getstate__(self):
        return {"vocab_file": self.vocab_file}

    def __setstate__(self, state):
        self.__init__(state["vocab_file"])

    def workdir_files(self) -> dict[str, bytes]:
        return {WORKDIR_FILE: self.vocab_file}

    def pieces(self, text: str) -> list[int]:
        """The ids of one text, without <start_of_text>/<end_of_text> (open_clip's SimpleTokenizer.encode)."""
        ids = []
        for word in self.pattern.findall(clean(text)):
            cached = self.cache.get(word)
            if cached is None:
                if len(self.cache) >= _CACHE_LIMIT:
                    self._clear_cache()
                cached = self.cache[word] = self._bpe(word)
            ids.extend(cached)
        return ids

    def _bpe(self, word: str) -> tuple[int, ...]:
        """open_clip's merge loop: merge every occurrence of the lowest-ranked pair until none is left."""
        symbols = [self.byte_encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            first, second = best
            merged, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(self.encoder[s] for s in symbols)

    def encode(self, texts: Sequence[str], length: int) -> np.ndarray:
        """int32 [N, length], equal to open_clip.tokenize(texts, context_length=length)."""
        return pack([self.pieces(text) for text in texts], length, self.bos_id, self.eos_id, self.pad_id)

    def decode(self, ids) -> list[str]:
        """Per row: the text up to the first <end_of_text> (or before trailing padding when it has
        none), <start_of_text> dropped, each word followed by one space, stripped. Zeros before
        the end are kept: id 0 is also "!"."""
        texts = []
        for row in np.asarray(ids).tolist():
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            else:
                while row and row[-1] == self.pad_id:
                    row.pop()
            symbols = "".join(self.decoder[i] for i in row if 0 <= i < self.bos_id)  # specials dropped
            data = bytes(self.byte_decoder[c] for c in symbols)
            texts.append(data.decode("utf-8", errors="replace").replace("</w>", " ").strip())
        return texts
