"""Caption metrics as the COCO caption evaluation computes them (pycocoevalcap), without Java.

The algorithms follow coco-caption / pycocoevalcap (Chen et al. 2015, arXiv:1504.00325):
text is tokenised (`tokenize`), then

- `bleu4`: corpus BLEU-4 (Papineni et al. 2002) as pycocoevalcap's Bleu(4): clipped n-gram
  counts (each n-gram's count clipped to its largest count in any one reference) and n-gram
  totals summed over the corpus, precisions p_n = (correct_n + 1e-15) / (total_n + 1e-9) (the
  reference's guards against 0/0, kept so the numbers match), their geometric mean, times the
  brevity penalty exp(1 - r / c) when c < r, c the total candidate length and r the sum over
  captions of the "closest" reference length (the reference length nearest the candidate's,
  the shorter one on a tie).
- `cider_d`: CIDEr-D (Vedantam et al. 2015, arXiv:1411.5726) as pycocoevalcap's Cider /
  coco-caption's cider-D: for n = 1..4, TF-IDF vectors of n-gram counts with the IDF
  log(#images / df) from the document frequencies df over the REFERENCES of the evaluated
  corpus (an image counts once per n-gram; df floored at 1, so an n-gram no reference has
  weighs log(#images)); per reference, the cosine with the candidate's vector where each
  candidate weight is clipped to the reference's, times the Gaussian length penalty
  exp(-(l_c - l_r)² / (2·6²)); averaged over n and over the references, times 10; the corpus
  score is the mean over images. Like the reference, the IDF comes from the corpus passed in:
  scores of different subsets are not comparable, and a one-image corpus scores 0.
"""
from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

MAX_N = 4
CIDER_SIGMA = 6.0
_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's guards in the BLEU precision (correct + tiny) / (total + small)

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00b4": "'", "`": "'"})
_CONTRACTION = re.compile(r"(?<=[^\W_])(n't|'(?:s|re|ve|ll|d|m))\b")
# A word: letters/digits, joined by inner hyphens, periods or apostrophes ("t-shirt", "3.5",
# "o'clock") or commas between digits ("1,000"); then the split-off contractions; then any
# other single non-space character (punctuation, symbols).
_TOKEN = re.compile(r"[^\W_]+(?:(?:[-.']|(?<=\d),(?=\d))[^\W_]+)*|n't|'(?:s|re|ve|ll|d|m)\b|\S")
# What pycocoevalcap's PTBTokenizer drops after tokenising: quotes, brackets (-LRB- etc.),
# . ? ! , : ; - -- ... ; every token made only of these characters is removed.
_PUNCTUATION = set("'\"`()[]{}.?!,:;-_")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens, punctuation removed, in the spirit of the COCO caption
    evaluation (Stanford PTBTokenizer -lowerCase, then its punctuation list removed).

    What it does: curly quotes become straight ones; the text is lower-cased; the clitics n't,
    's, 're, 've, 'll, 'd, 'm are split off as PTB does ("don't" -> "do n't", "dog's" ->
    "dog 's"); words keep inner hyphens, periods and apostrophes ("t-shirt", "3.5",
    "o'clock") and commas between digits ("1,000"); every other character is its own token,
    and tokens made only of . , ? ! : ; - _ ' " ` and brackets are dropped. Symbols such as
    & / % $ stay as tokens. Known differences from PTB: an abbreviation loses its final
    period ("u.s." -> "u.s"; PTB keeps "u.s."), square brackets are dropped (PTB keeps them
    as -lsb-/-rsb-), and "/" and "*" are not escaped.
    """
    text = text.translate(_QUOTES).lower()
    text = _CONTRACTION.sub(r" \1", text)
    return [t for t in _TOKEN.findall(text) if not set(t) <= _PUNCTUATION]


def _ngrams(tokens: list[str], max_n: int = MAX_N) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def _check(predictions, references):
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no captions to score")
    if any(isinstance(refs, str) or len(refs) == 0 for refs in references):
        raise ValueError("references must be one non-empty list of strings per prediction")


def bleu4(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 of the predictions (one per image) against their references, in [0, 1]."""
    _check(predictions, references)
    correct, total = np.zeros(MAX_N), np.zeros(MAX_N)
    cand_len = ref_len = 0
    for pred, refs in zip(predictions, references):
        cand = tokenize(pred)
        ref_tokens = [tokenize(r) for r in refs]
        max_ref = Counter()
        for r in ref_tokens:
            max_ref |= _ngrams(r)  # | keeps each n-gram's largest count
        for gram, count in _ngrams(cand).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        total += [max(0, len(cand) - n + 1) for n in range(1, MAX_N + 1)]
        cand_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in ref_tokens)[1]
    log_precision = np.log((correct + _TINY) / (total + _SMALL))
    score = math.exp(log_precision.mean())
    ratio = (cand_len + _TINY) / (ref_len + _SMALL)
    if ratio < 1:
        score *= math.exp(1 - 1 / ratio)
    return float(score)


def _tfidf(grams: Counter, doc_freq: Counter, log_num_docs: float):
    """Per n: {n-gram: tf·idf} and the vector's norm, and the length used by the length penalty."""
    vecs = [{} for _ in range(MAX_N)]
    for gram, tf in grams.items():
        vecs[len(gram) - 1][gram] = tf * (log_num_docs - math.log(max(1.0, doc_freq[gram])))
    norms = [math.sqrt(sum(w * w for w in v.values())) for v in vecs]
    # pycocoevalcap takes the length from its bigram counts (words - 1 for a non-empty caption);
    # the differences of lengths, all the penalty uses, are the same as of word counts.
    return vecs, norms, sum(grams[g] for g in vecs[1])


def cider_d_per_image(predictions: list[str], references: list[list[str]]) -> np.ndarray:
    """CIDEr-D of each prediction [N] (the corpus score is their mean)."""
    _check(predictions, references)
    cands = [_ngrams(tokenize(p)) for p in predictions]
    refs = [[_ngrams(tokenize(r)) for r in rs] for rs in references]
    doc_freq = Counter(gram for rs in refs for gram in set().union(*rs))
    log_num_docs = math.log(len(refs))
    scores = np.zeros(len(cands))
    for i, (cand, rs) in enumerate(zip(cands, refs)):
        c_vecs, c_norms, c_len = _tfidf(cand, doc_freq, log_num_docs)
        per_n = np.zeros(MAX_N)
        for ref in rs:
            r_vecs, r_norms, r_len = _tfidf(ref, doc_freq, log_num_docs)
            penalty = math.exp(-((c_len - r_len) ** 2) / (2 * CIDER_SIGMA**2))
            for n in range(MAX_N):
                dot = sum(min(w, r_vecs[n].get(g, 0.0)) * r_vecs[n].get(g, 0.0) for g, w in c_vecs[n].items())
                if c_norms[n] and r_norms[n]:
                    dot /= c_norms[n] * r_norms[n]
                per_n[n] += dot * penalty
        scores[i] = 10.0 * per_n.mean() / len(rs)
    return scores


def cider_d(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus CIDEr-D (pycocoevalcap's "CIDEr"): the mean over images; 0 to 10 in principle."""
    return float(cider_d_per_image(predictions, references).mean())


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """{"bleu4": corpus BLEU-4 in [0, 1], "cider": corpus CIDEr-D} of one prediction per image."""
    return {"bleu4": bleu4(predictions, references), "cider": cider_d(predictions, references)}
