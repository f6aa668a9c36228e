"""The CLIP BPE tokenizer (data.tokenizer="clip_bpe"): open_clip's ids, the workdir copy, errors.

The parity tests need open_clip's tokenizer, which imports torch: they skip without
open_clip_torch, ftfy or torch (`pip install -e .[interop]`, torch from a CPU wheel index).
Importing the open_clip package also imports torchvision and timm, so its tokenizer.py is
loaded on its own, by file path. The other tests use a small vocabulary written here and run
everywhere.
"""
import gzip
import importlib.util
import os
import pickle
import random
import subprocess
import sys
import types

import numpy as np
import pytest

from mmjax import run_record
from mmjax.data import clip_bpe, pipeline
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.errors import UserError

# --- a small vocabulary: runs without open_clip ----------------------------------------

MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "o n</w>", "o f</w>", "p h", "o t", "ot o</w>", "ph oto</w>", "m a", "ma t</w>"]


@pytest.fixture
def small_vocab(tmp_path):
    path = tmp_path / "small_vocab.txt.gz"
    path.write_bytes(gzip.compress(("#version: test\n" + "\n".join(MERGES) + "\n").encode()))
    return str(path)


def test_small_vocabulary_layout_round_trip_and_truncation(small_vocab):
    tok = clip_bpe.load(f"clip_bpe:{small_vocab}")
    assert isinstance(tok, tokenizer_lib.TextTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (526, 524, 525, 0)
    texts = ["a photo of the cat", "the cat on a mat", "zebra", ""]
    ids = tok.encode(texts, 12)
    assert ids.shape == (4, 12) and ids.dtype == np.int32
    assert ids[0, :6].tolist() == [tok.bos_id, *(tok.encoder[p] for p in ("a</w>", "photo</w>", "of</w>", "the</w>", "cat</w>"))]
    assert tok.decode(ids) == texts
    assert tok.encode(["a photo of the cat"], 4).tolist() == [[tok.bos_id, tok.encoder["a</w>"], tok.encoder["photo</w>"],
                                                              tok.eos_id]]
    assert tok.encode([""], 2).tolist() == [[tok.bos_id, tok.eos_id]]


def test_decode_keeps_exclamation_marks_and_drops_padding(small_vocab):
    tok = clip_bpe.load(f"clip_bpe:{small_vocab}")
    assert tok.encoder["!"] == 0 == tok.pad_id  # as in open_clip: id 0 is "!" and the padding
    ids = tok.encode(["the cat!", "!"], 8)
    assert tok.decode(ids) == ["the cat !", "!"]
    assert tok.decode(ids[:, :-1][:, [0, 1, 2, 3, 5, 6]]) == ["the cat !", "!"]  # rows without EOS: trailing zeros dropped


def test_pickles_for_worker_processes(small_vocab):
    tok = clip_bpe.load(f"clip_bpe:{small_vocab}")
    tok.encode(["warm the cache"], 8)
    copy = pickle.loads(pickle.dumps(tok))
    assert len(pickle.dumps(tok)) < 10_000  # the file's bytes, not the tables
    assert copy.encode(["the cat on a mat"], 8).tolist() == tok.encode(["the cat on a mat"], 8).tolist()


def test_make_tokenizer_reads_the_spec_and_caches_nothing(small_vocab, tmp_path):
    cfg = pipeline.default_data_config()
    cfg.tokenizer = f"clip_bpe:{small_vocab}"
    tok = pipeline.make_tokenizer(cfg, str(tmp_path / "cache" / "tokenizer.model"))
    assert isinstance(tok, clip_bpe.ClipBPETokenizer) and tok.vocab_size == 526
    assert not (tmp_path / "cache").exists()


def test_workdir_keeps_the_vocabulary_and_load_rebuilds_it(small_vocab, tmp_path):
    from mmjax.configs import load_config

    config = load_config("configs/clip.py")
    config.data.tokenizer = f"clip_bpe:{small_vocab}"
    tok = pipeline.make_tokenizer(config.data, str(tmp_path / "tokenizer.model"))
    workdir = tmp_path / "run"
    workdir.mkdir()
    run_record.write(str(workdir), config, tok)
    assert (workdir / clip_bpe.WORKDIR_FILE).read_bytes() == open(small_vocab, "rb").read()
    assert not (workdir / "tokenizer.model").exists()
    os.remove(small_vocab)  # the workdir alone rebuilds it
    recorded, loaded = run_record.load(str(workdir))
    assert recorded.data.tokenizer == config.data.tokenizer
    assert isinstance(loaded, clip_bpe.ClipBPETokenizer)
    texts = ["a photo of the cat", "Zürich &amp; 東京 🐱"]
    assert loaded.encode(texts, 16).tolist() == tok.encode(texts, 16).tolist()
    assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.vocab_size, tok.bos_id, tok.eos_id, 0)

    os.remove(workdir / clip_bpe.WORKDIR_FILE)
    with pytest.raises(UserError) as e:
        run_record.load(str(workdir))
    assert str(workdir / clip_bpe.WORKDIR_FILE) in str(e.value) and "\n" not in str(e.value)


def test_sentencepiece_workdirs_still_load(tmp_path):
    from mmjax.configs import load_config
    from mmjax.data import shapes

    config = load_config("configs/clip.py")
    tok = tokenizer_lib.Tokenizer(tokenizer_lib.train(shapes.all_texts(), 96))
    run_record.write(str(tmp_path), config, tok)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "tokenizer.model"]
    _, loaded = run_record.load(str(tmp_path))
    assert isinstance(loaded, tokenizer_lib.Tokenizer) and loaded.proto == tok.proto


def test_missing_vocabulary_says_where_it_looked(tmp_path, monkeypatch):
    missing = tmp_path / "nope" / "bpe_simple_vocab_16e6.txt.gz"
    with pytest.raises(UserError) as e:
        clip_bpe.load(f"clip_bpe:{missing}")
    assert str(missing) in str(e.value) and "\n" not in str(e.value)

    # open_clip installed, its file absent: the message names the path it looked at
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: types.SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    with pytest.raises(UserError) as e:
        clip_bpe.load("clip_bpe")
    assert str(tmp_path / clip_bpe.VOCAB_NAME) in str(e.value) and "\n" not in str(e.value)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # open_clip not installed
    with pytest.raises(UserError) as e:
        clip_bpe.load("clip_bpe")
    message = str(e.value)
    assert "no open_clip package is installed" in message and "pip install open_clip_torch" in message
    assert "clip_bpe:/path/to/bpe_simple_vocab_16e6.txt.gz" in message and "\n" not in message


def test_not_a_vocabulary_is_clear(tmp_path):
    for name, data in (("junk.gz", b"\x1f\x8bnot gzip"), ("words.txt", b"header\none two three\n"), ("empty.txt", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match="is not a CLIP BPE vocabulary"):
            clip_bpe.load(f"clip_bpe:{tmp_path / name}")


def test_spec_values():
    assert clip_bpe.is_spec("clip_bpe") and clip_bpe.is_spec("clip_bpe:/x/y.txt.gz")
    assert not clip_bpe.is_spec("") and not clip_bpe.is_spec("clip_bpe.model") and not clip_bpe.is_spec("/x/clip_bpe")


# --- parity with open_clip -------------------------------------------------------------

WORDS = [
    "a", "photo", "of", "the", "cat", "dog", "sitting", "on", "mat", "Hello", "WORLD", "Tokenizer", "x", "ab",
    "don't", "it's", "WE'LL", "i'm", "they've", "she'd", "you're", "Isn't", "o'clock", "rock'n'roll",
    "2024", "3.14", "1,000", "007", "½", "²", "٣", "Ⅻ", "1st", "4K", "x86_64", "v1.2.3",
    "...", "!?", "!!!", "--", "—", "–", "“quoted”", "‘single’", "«guillemets»", "(parens)", "[brackets]", "{braces}",
    "#hashtag", "@user", "http://example.com/a?b=c&d=e", "$5", "100%", "C++", "e-mail", "_under_score_", "a/b\\c",
    "café", "naïve", "Zürich", "São Paulo", "Ångström", "crème brûlée", "İstanbul", "straße", "ΣΊΣΥΦΟΣ", "ǅungla",
    "e\u0301", "n\u0303o", "Ωmega", "ﬁsh", "Ｆｕｌｌｗｉｄｔｈ", "ｶﾀｶﾅ", "№", "™", "°C", "µm", "Ⓐ",
    "日本語", "中文字符", "한국어", "テキスト", "漢字かな交じり文", "北京", "東京タワー",
    "مرحبا", "שלום", "नमस्ते", "สวัสดี", "Привет", "Ελληνικά", "ქართული", "Հայերեն", "አማርኛ",
    "🐱", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "🤖🚀", "☃", "✓", "🀄",
    "&amp;", "&lt;b&gt;", "&gt;", "&quot;", "&#39;", "&nbsp;", "&amp;amp;", "&amp;amp;amp;", "&#x1F600;", "&eacute;",
    "&copy;", "&#8217;", "&bogus;", "&", "<br/>", "<p>tag</p>",
    "cafÃ©", "â€™", "Ã¼ber", "Ã©tÃ©", "â€œmojibakeâ€\x9d",
    "<start_of_text>", "<end_of_text>", "<START_OF_TEXT>", "</w>", "<|endoftext|>",
    "\x00", "\x07", "\u200b", "\ufeff", "\u00ad", "\u202e", "\ufffd",
]
SEPARATORS = [" ", " ", " ", "", "  ", "\t", "\n", "\u00a0", "\u3000", "\u2003", "\r\n", " \u200b "]
HANDWRITTEN = [
    "", " ", "   \t\n  ", "\u00a0\u3000", "a photo of a cat", "A PHOTO OF A CAT.", "  leading and trailing  ",
    "multiple     spaces\t\ttabs\n\nnewlines", "itap of a {}.", "a bad photo of the {}.", "a photo of my CAT's toy",
    "I'LL BE BACK", "&amp;lt;not a tag&amp;gt;", "Tom &amp; Jerry", "fish &amp;amp; chips", "It&#39;s fine",
    "5 &lt; 6 &gt; 4", "&nbsp;&nbsp;spaces", "ﬁnal ﬂight", "ＡＢＣ１２３", "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis " * 3, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "ababababababababababab", "the the the the the", "123456789012345678901234567890", "😀😃😄😁😆😅😂🤣",
    "word " * 76, "word " * 75, "word " * 74, "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 4,
    "A very long caption that goes on and on, describing every object in the image in excruciating detail: " * 5,
    "日本語" * 60, "🐱" * 100, "&amp;" * 100, "<start_of_text>" * 3, "x<end_of_text>y", "don'T", "'s's's",
]


def corpus(n: int = 1300, seed: int = 0) -> list[str]:
    """HANDWRITTEN, then random mixes of WORDS, separators and random code points; some long."""
    rng = random.Random(seed)
    texts = list(HANDWRITTEN)
    while len(texts) < n:
        count = rng.choice([1, 2, 3, 5, 8, 13, 40, 120]) if rng.random() < 0.9 else rng.randint(150, 400)
        parts = []
        for _ in range(count):
            r = rng.random()
            if r < 0.8:
                word = rng.choice(WORDS)
            elif r < 0.9:  # any code point but surrogates
                word = "".join(chr(rng.choice([rng.randint(0x20, 0x2FF), rng.randint(0x300, 0xD7FF),
                                               rng.randint(0xE000, 0x10FFFF)])) for _ in range(rng.randint(1, 4)))
            else:
                word = rng.choice(WORDS).upper() if rng.random() < 0.5 else rng.choice(WORDS).title()
            parts.append(word)
            parts.append(rng.choice(SEPARATORS))
        text = "".join(parts)
        texts.append(text if rng.random() < 0.8 else rng.choice(SEPARATORS) + text + rng.choice(SEPARATORS))
    return texts


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    """open_clip's tokenizer module, loaded from its file (importing the package would import torchvision)."""
    pytest.importorskip("torch", reason="open_clip's tokenizer imports torch (pip install -e .[interop])")
    found = importlib.util.find_spec("open_clip")
    if found is None or not found.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed (pip install -e .[interop])")
    path = os.path.join(found.submodule_search_locations[0], "tokenizer.py")
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok(open_clip_tokenizer):
    return clip_bpe.load("clip_bpe")


def test_corpus_is_varied():
    texts = corpus()
    assert len(texts) >= 1000 and len(set(texts)) > 1200
    assert "" in texts and any(len(t) > 2000 for t in texts) and any("&amp;" in t for t in texts)


def test_same_ids_as_open_clip(open_clip_tokenizer, tok):
    texts = corpus()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (49408, 49406, 49407, 0)
    expected = open_clip_tokenizer.tokenize(texts).numpy()  # context_length=77, open_clip's default
    ids = tok.encode(texts, 77)
    assert ids.dtype == np.int32 and ids.shape == expected.shape == (len(texts), 77)
    mismatched = [texts[i] for i in np.flatnonzero((ids != expected).any(axis=1))]
    assert not mismatched, f"{len(mismatched)} texts differ, e.g. {mismatched[:3]!r}"
    truncated = (expected[:, -1] != 0).sum()
    assert truncated > 100  # the corpus exercises truncation (EOT as the last token)
    assert (expected[expected[:, -1] != 0, -1] == tok.eos_id).all()


@pytest.mark.parametrize("length", [2, 3, 5, 16, 78])
def test_same_truncation_as_open_clip_at_other_lengths(open_clip_tokenizer, tok, length):
    texts = corpus(300, seed=length)
    expected = open_clip_tokenizer.tokenize(texts, context_length=length).numpy()
    assert tok.encode(texts, length).tolist() == expected.tolist()


def test_text_len_78_feeds_the_model_open_clips_77_token_rows(open_clip_tokenizer, tok):
    texts = corpus(300, seed=2)
    expected = open_clip_tokenizer.tokenize(texts, context_length=77).numpy()
    read = tok.encode(texts, 78)[:, :-1]  # the positions the model reads
    fits = np.array([len(tok.pieces(t)) <= 75 for t in texts])
    assert 50 < fits.sum() < len(texts)
    assert (read[fits] == expected[fits]).all()
    # a longer text: 76 pieces are read, open_clip's row holds 75 and <end_of_text> (see clip_bpe's docstring)
    assert (read[~fits, -1] != tok.eos_id).all() and (expected[~fits, -1] == tok.eos_id).all()


def test_pieces_and_decode_match_open_clip(open_clip_tokenizer, tok):
    reference = open_clip_tokenizer.SimpleTokenizer()
    texts = corpus(400, seed=1)
    for text in texts:
        pieces = tok.pieces(text)
        assert pieces == reference.encode(text)
        if tok.eos_id not in pieces:  # a written <end_of_text> ends the decoded text
            row = tok.encode([text], len(pieces) + 2)
            assert tok.decode(row)[0] == reference.decode([p for p in pieces if p != tok.bos_id]).strip()


def test_plain_text_round_trips(tok):
    texts = ["a photo of a cat", "two dogs playing in the snow", "the quick brown fox jumps over the lazy dog", ""]
    assert tok.decode(tok.encode(texts, 77)) == texts


def test_tokenizing_imports_neither_open_clip_nor_torch():
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch is not installed (pip install -e .[interop])")
    code = ("import sys; from mmjax.data import clip_bpe; tok = clip_bpe.load('clip_bpe'); tok.encode(['a cat'], 77); "
            "print(sorted({'torch', 'open_clip'} & set(sys.modules)), clip_bpe.vocab_path('clip_bpe'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "[]" and out[1].endswith(os.path.join("open_clip", clip_bpe.VOCAB_NAME))
