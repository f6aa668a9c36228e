"""The evaluators' numeric core on small cases worked out by hand (numpy/scipy only, no model)."""
import math

import numpy as np
import pytest

from mmjax.errors import UserError
from mmjax.evals import caption_metrics, linear_probe, prompts, retrieval, zeroshot

R2 = 1 / math.sqrt(2)


# ----------------------------------------------------------------------------- zero-shot


def test_clip_class_embeddings_average_templates_then_renormalise():
    # class 0: templates e0 and e1        -> mean (.5, .5)  -> (1/√2, 1/√2)
    # class 1: (3, 4) (normalised first to (.6, .8)) and (.6, -.8) -> mean (.6, 0) -> (1, 0)
    # class 2: -e0 and -e1                -> (-1/√2, -1/√2)
    templates = np.array([[[1, 0], [0, 1]], [[3, 4], [0.6, -0.8]], [[-1, 0], [0, -1]]], float)
    np.testing.assert_allclose(zeroshot.class_embeddings(templates), [[R2, R2], [1, 0], [-R2, -R2]], atol=1e-12)
    # Images and their cosines with the three classes:
    #   (1, 0):     .707  1     -.707  -> class 1
    #   (0, 1):     .707  0     -.707  -> class 0 (label 1 ranks second)
    #   (-.6, -.8): -.990 -.6   .990   -> class 2
    #   (.8, .6):   .990  .8    -.990  -> class 0
    images = np.array([[1, 0], [0, 1], [-0.6, -0.8], [0.8, 0.6]])
    labels = np.array([1, 1, 2, 0])
    scores = zeroshot.class_scores(images, templates, protocol="clip")
    np.testing.assert_allclose(scores[1], [R2, 0, -R2], atol=1e-12)
    assert zeroshot.topk_accuracy(scores, labels, 1) == 0.75
    assert zeroshot.topk_accuracy(scores, labels, 2) == 1.0
    # Per class: class 0 1/1, class 1 1/2, class 2 1/1 -> 5/6; class 3 has no example and is skipped.
    assert zeroshot.mean_per_class_recall(scores, labels, num_classes=4) == pytest.approx(5 / 6)


def test_topk_accuracy_ranks_ties_by_class_index():
    scores = np.array(
        [
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 0 ranks 6th: miss at 5
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 4 ranks 5th: hit at 5 only
            [0.3, 0.9, 0.9, 0.0, 0.0, 0.0],  # label 2 ties class 1, which comes first: 2nd
            [0.3, 0.9, 0.9, 0.0, 0.0, 0.0],  # label 1: 1st
        ]
    )
    labels = np.array([0, 4, 2, 1])
    assert zeroshot.topk_accuracy(scores, labels, 1) == 0.25
    assert zeroshot.topk_accuracy(scores, labels, 2) == 0.5
    assert zeroshot.topk_accuracy(scores, labels, 5) == 0.75
    assert zeroshot.mean_per_class_recall(scores, labels, 6) == pytest.approx(1 / 4)  # 4 classes, one hit


def test_prob_sum_marginalises_over_each_class_prompts():
    # One image, two classes with two prompts each, logit scale e^0 = 1: class 0 has
    # similarities {0.9, -0.9}, class 1 {0.5, 0.5}; p(class) ∝ Σ_prompts e^sim.
    image = np.array([[1.0, 0.0]])
    s = math.sqrt(1 - 0.81)
    prompts_ = np.array([[0.9, s], [-0.9, s], [0.5, math.sqrt(0.75)], [0.5, -math.sqrt(0.75)]])
    log_p = zeroshot.class_log_probs(image, prompts_, prompts_per_class=2, logit_scale=0.0)
    expected = np.log([math.exp(0.9) + math.exp(-0.9), 2 * math.exp(0.5)])
    expected -= np.log(np.exp(expected).sum())
    np.testing.assert_allclose(log_p[0], expected, rtol=1e-6)
    assert log_p[0].argmax() == 1  # summed, class 1's two 0.5s (3.297) beat class 0's 0.9 and -0.9 (2.866)
    np.testing.assert_allclose(zeroshot.class_scores(image, prompts_.reshape(2, 2, 2), "prob_sum", 0.0), log_p)
    # At a sharp temperature the best single prompt decides: class 0 (0.9 > 0.5).
    sharp = zeroshot.class_log_probs(image, prompts_, prompts_per_class=2, logit_scale=math.log(100))
    assert sharp[0].argmax() == 0
    np.testing.assert_allclose(np.exp(sharp).sum(axis=1), 1.0, rtol=1e-6)
    # CLIP's protocol averages the prompts instead: class 0 -> (0, 1), class 1 -> (1, 0).
    assert zeroshot.class_scores(image, prompts_.reshape(2, 2, 2), "clip")[0].argmax() == 1
    with pytest.raises(ValueError, match="clip"):
        zeroshot.class_scores(image, prompts_.reshape(2, 2, 2), "mean")


# ----------------------------------------------------------------------------- retrieval

# Images e0, e1, e2; caption embeddings a = e0, b = e1, c = e2, m = (e0 + e1)/√2 and
# z = -(1, 1, 1)/√3, five captions per image, several of them identical strings:
#            image 0          image 1          image 2
CAPTIONS = ["m", "m", "z", "z", "z", "a", "m", "z", "z", "z", "b", "b", "z", "z", "c"]
# Dot products:     a    b    c    m     z
#            I0     1    0    0   .707 -.577
#            I1     0    1    0   .707 -.577
#            I2     0    0    1    0   -.577
# Image→text (rank = negatives strictly above the best positive):
#   I0: best positive m .707; negatives above: image 1's a (1); image 1's m ties -> rank 1
#   I1: best positive m .707; negatives above: image 2's b, b (1); image 0's m ties -> rank 2
#   I2: best positive c 1; nothing above -> rank 0
#   R@1 = 1/3, R@2 = 2/3, R@5 = 1
# Text→image: m: I0 and I1 tie at .707 -> rank 0 for both m of image 0 and the m of image 1;
#   z: all three images tie -> rank 0; a (image 1): I0 scores 1 > 0 -> rank 1;
#   b (image 2, twice): I1 scores 1 > 0 -> rank 1; c: rank 0.
#   R@1 = 12/15, R@2 = 1
I2T = {1: 1 / 3, 2: 2 / 3, 5: 1.0}
T2I = {1: 12 / 15, 2: 1.0, 5: 1.0}


def _retrieval_case():
    vec = {"a": [1, 0, 0], "b": [0, 1, 0], "c": [0, 0, 1], "m": [R2, R2, 0], "z": [-1 / math.sqrt(3)] * 3}
    images = np.eye(3, dtype=np.float32)
    texts = np.array([vec[c] for c in CAPTIONS], np.float32)
    text_image = np.repeat(np.arange(3), 5)
    return images, texts, text_image


def _expected():
    return {**{f"image_to_text_r@{k}": v for k, v in I2T.items()}, **{f"text_to_image_r@{k}": v for k, v in T2I.items()}}


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_recall_with_five_captions_per_image_and_exact_ties(chunk_size):
    images, texts, text_image = _retrieval_case()
    result = retrieval.recall_at_k(images, texts, text_image, ks=(1, 2, 5), chunk_size=chunk_size)
    assert result == pytest.approx(_expected())
    assert list(result) == [f"{d}_r@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 2, 5)]


def test_recall_does_not_depend_on_dataset_order():
    images, texts, text_image = _retrieval_case()
    rng = np.random.default_rng(0)
    image_perm, text_perm = rng.permutation(3), rng.permutation(15)
    new_index = np.argsort(image_perm)  # old image id -> its new position
    result = retrieval.recall_at_k(images[image_perm], texts[text_perm], new_index[text_image[text_perm]], ks=(1, 2, 5), chunk_size=2)
    assert result == pytest.approx(_expected())


def test_recall_leaves_out_images_without_captions_and_checks_indices():
    images, texts, text_image = _retrieval_case()
    extra = np.vstack([images, [[0.0, 0.0, -1.0]]])  # image 3: no caption, scores -1 against c
    result = retrieval.recall_at_k(extra, texts, text_image, ks=(1,))
    # Image→text as before (image 3 has no correct answer, so it is not a query). Text→image:
    # image 3 scores +.577 against z, above z's own images (-.577), so the eight z captions
    # now miss; a, m, b, c are unaffected (image 3 scores 0 or -1 there): hits m, m, m, c -> 4/15.
    assert result == pytest.approx({"image_to_text_r@1": 1 / 3, "text_to_image_r@1": 4 / 15})
    with pytest.raises(ValueError, match="index"):
        retrieval.recall_at_k(images, texts, text_image + 1)


def test_top_matches():
    images, texts, _ = _retrieval_case()
    # I0: a (text 5) scores 1, then the m's (texts 0, 1, 6) at .707 in index order.
    # I2: c (text 14) scores 1, then the texts scoring 0 in index order: 0, 1, 5.
    for chunk_size in (1, 2, 100):
        np.testing.assert_array_equal(retrieval.top_matches(images, texts, k=3, chunk_size=chunk_size)[[0, 2]], [[5, 0, 1], [14, 0, 1]])
    # Text 5 (a = e0): I0 scores 1, then I1 and I2 tie at 0.
    np.testing.assert_array_equal(retrieval.top_matches(texts[5:6], images, k=3), [[0, 1, 2]])
    assert retrieval.top_matches(texts, images, k=5).shape == (15, 3)  # k capped at the 3 images


def test_chance_recall():
    # 5 captions for each of 3 images: i2t R@1 = mean of 5/15 = 1/3; t2i 1/3.
    assert retrieval.chance_recall_at_1(np.repeat(np.arange(3), 5), 3) == pytest.approx(
        {"image_to_text_r@1": 1 / 3, "text_to_image_r@1": 1 / 3}
    )
    # Captions [0, 0, 0, 1], image 2 has none: i2t R@1 = mean(3/4, 1/4) = 1/2 (= 1 / captioned
    # images); R@2 = mean(1 - C(1,2)/C(4,2), 1 - C(3,2)/C(4,2)) = mean(1, 1 - 3/6) = 3/4.
    # t2i: k / 3.
    chance = retrieval.chance_recall_at_k([0, 0, 0, 1], 3, ks=(1, 2))
    assert chance == pytest.approx(
        {"image_to_text_r@1": 0.5, "image_to_text_r@2": 0.75, "text_to_image_r@1": 1 / 3, "text_to_image_r@2": 2 / 3}
    )


# ----------------------------------------------------------------------------- captions


def test_tokenize_lowercases_splits_clitics_and_drops_punctuation():
    assert caption_metrics.tokenize("A dog's T-shirt, (red)... isn't 3.5 m!") == [
        "a", "dog", "'s", "t-shirt", "red", "is", "n't", "3.5", "m"
    ]


def test_bleu4():
    # Perfect match: every precision and the brevity penalty are 1 (up to pycocoevalcap's
    # 1e-9 guard in the denominators).
    refs = [["A big red circle.", "one red circle"], ["Two small blue squares"]]
    assert caption_metrics.bleu4(["a big red circle", "two small blue squares ."], refs) == pytest.approx(1.0, rel=1e-8)
    # Two images (case and punctuation are tokenised away):
    #  "a red circle on the left" vs refs "a red circle on the right" (6), "one red circle" (3)
    #    n-gram matches 5/6, 4/5, 3/4, 2/3; closest reference length 6
    #  "two blue squares" vs "two blue squares", "two squares that are blue"
    #    matches 3/3, 2/2, 1/1, 0/0; closest reference length 3
    #  corpus: 8/9, 6/7, 4/5, 2/3; length 9 = reference 9, no penalty
    #  BLEU-4 = (8·6·4·2 / (9·7·5·3))^(1/4) = (384/945)^(1/4) = 0.7984
    preds = ["A red circle on the left.", "two blue squares"]
    refs = [["a red circle on the right", "one red circle"], ["two blue squares", "two squares that are blue"]]
    assert caption_metrics.bleu4(preds, refs) == pytest.approx((384 / 945) ** 0.25, rel=1e-8)
    # Brevity: "a red circle on the" (5 words), precisions 1 against every reference set below.
    # The reference length is the closest one: against 6 and 2 words it is 6, penalty
    # exp(1 - 6/5) (the shortest, 2, would give none); against 6 and 4 (both 1 away) the
    # shorter, 4: no penalty.
    pred = ["a red circle on the"]
    assert caption_metrics.bleu4(pred, [["a red circle on the right", "a circle"]]) == pytest.approx(math.exp(-0.2), rel=1e-8)
    assert caption_metrics.bleu4(pred, [["a red circle on the right", "a red circle on"]]) == pytest.approx(1.0, rel=1e-8)
    # pycocoevalcap's guards: with no 4-gram at all, p4 = (0 + 1e-15) / (0 + 1e-9) = 1e-6, not 0/0;
    # "a red circle" vs a 6-word reference: (1·1·1·1e-6)^(1/4) · exp(1 - 6/3).
    assert caption_metrics.bleu4(["a red circle"], [["a red circle on the right"]]) == pytest.approx(
        1e-6**0.25 * math.exp(-1), rel=1e-6
    )


def test_cider_d():
    # Two images, one reference each: "red circle" and "blue square". Every reference n-gram
    # occurs for one image of two: idf = log(2/1) = ln 2 (and an n-gram no reference has: df
    # floored at 1, idf ln 2 too).
    #  "red square" vs "red circle": unigrams (red ln2, square ln2)·(red ln2, circle ln2) =
    #    ln2² over norms √2·ln2 each -> 1/2; bigrams share nothing -> 0; no 3-/4-grams -> 0;
    #    same length: no penalty. CIDEr-D = 10 · mean(1/2, 0, 0, 0) = 1.25
    #  "blue square" = its reference: cosines 1, 1, 0, 0 -> 10 · 2/4 = 5
    refs = [["red circle"], ["Blue square."]]
    np.testing.assert_allclose(caption_metrics.cider_d_per_image(["red square", "blue square"], refs), [1.25, 5.0])
    assert caption_metrics.cider_d(["red square", "blue square"], refs) == pytest.approx((1.25 + 5) / 2)
    # Clipping and the length penalty: "red circle red circle" vs "red circle".
    #  unigrams: candidate (2ln2, 2ln2), reference (ln2, ln2); clipped dot 2·min(2ln2, ln2)·ln2
    #    = 2ln2² over norms 2√2·ln2 and √2·ln2 -> 1/2 (1 unclipped)
    #  bigrams: candidate "red circle" 2ln2, "circle red" ln2 (norm √5·ln2); reference "red
    #    circle" ln2; clipped dot ln2² -> 1/√5
    #  lengths 4 and 2: penalty exp(-(4-2)² / (2·6²)) = exp(-1/18)
    repeated = 10 * (0.5 + 1 / math.sqrt(5)) / 4 * math.exp(-1 / 18)
    assert repeated == pytest.approx(2.2401, abs=1e-4)
    np.testing.assert_allclose(
        caption_metrics.cider_d_per_image(["red circle red circle", "blue square"], refs), [repeated, 5.0], rtol=1e-12
    )
    # A prediction equal to all of its references (4+ words) scores 10: every cosine is 1,
    # even though "a" occurs for both images (idf 0, weight 0 on both sides).
    refs = [["a big red circle", "A big red circle."], ["a small blue square", "a small blue square"]]
    scores = caption_metrics.caption_scores(["a big red circle", "a small blue square"], refs)
    assert scores == pytest.approx({"bleu4": 1.0, "cider": 10.0}, rel=1e-8)
    # One image alone: every idf is log(1/1) = 0, so CIDEr-D is 0 (as in pycocoevalcap).
    assert caption_metrics.cider_d(["a big red circle"], [["a big red circle"]]) == 0.0


# ----------------------------------------------------------------------------- linear probe


def _clusters(per_class, seed):
    # Three tight clusters at 10·e_c. (Every dimension carries signal: the probe whitens each
    # dimension with the few training examples' std, which would blow a pure-noise dimension
    # up to the signal's scale at 1 shot.)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), per_class)
    return 10 * np.eye(3)[labels] + 0.1 * rng.normal(size=(len(labels), 3)), labels


@pytest.mark.parametrize("method", linear_probe.METHODS)
def test_probe_separable_clusters(method):
    x_train, y_train = _clusters(30, seed=0)
    x_test, y_test = _clusters(10, seed=1)
    result = linear_probe.probe(x_train, y_train, x_test, y_test, 3, shots=(1, 5), method=method)
    assert result == {"1shot_top1": 1.0, "5shot_top1": 1.0, "full_top1": 1.0}


def test_fewshot_indices():
    labels = np.array([0, 1, 2, 0, 1, 0, 2, 0, 1])
    idx = linear_probe.fewshot_indices(labels, 2, seed=3)
    np.testing.assert_array_equal(labels[idx], [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(idx, linear_probe.fewshot_indices(labels, 2, seed=3))
    assert set(linear_probe.fewshot_indices(labels, 1, seed=3)) <= set(idx)  # nested: 1-shot ⊂ 2-shot
    assert len(linear_probe.fewshot_indices(labels, 10, seed=0)) == len(labels)  # all, when fewer than shots


def test_ridge_solves_the_normal_equations():
    # x = -1, 0, 1 with labels 0, 0, 1. Whitened: x' = x/σ, σ = √(2/3) (+1e-5), so Σx'² = 3;
    # plus the bias feature 100. Targets ±1: Y = [[1, -1], [1, -1], [-1, 1]].
    #   X'ᵀX' = [[3, 0], [0, 3·100²]],  X'ᵀY = [[-2/σ, 2/σ], [100, -100]]
    #   λ = 1: W' = (X'ᵀX' + I)⁻¹ X'ᵀY = [[-2/(4σ), 2/(4σ)], [100/30001, -100/30001]]
    #   raw features: W = W'[0]/σ = ∓2/(4σ²) = ∓0.75, b = 100·W'[1] = ±10000/30001
    x, y = np.array([[-1.0], [0.0], [1.0]]), np.array([0, 0, 1])
    w, b = linear_probe.ridge_classifier(x, y, 2, l2_reg=1.0)
    np.testing.assert_allclose(w, [[-0.75, 0.75]], rtol=1e-4)
    np.testing.assert_allclose(b, [10000 / 30001, -10000 / 30001], rtol=1e-4)
    # Fewer examples than dimensions (the dual solve): two constant features whiten to 0 and
    # change nothing.
    w, b = linear_probe.ridge_classifier(np.hstack([x, np.ones((3, 2))]), y, 2, l2_reg=1.0)
    np.testing.assert_allclose(w, [[-0.75, 0.75], [0, 0], [0, 0]], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(b, [10000 / 30001, -10000 / 30001], rtol=1e-4)


def test_logistic_reaches_the_optimum():
    # x = -1, 1 with labels 0, 1 (whitened x' = ±s, s = 1/(1 + 1e-5)); by symmetry b = 0 and
    # W' = (-u, u), and the loss log(1 + e^(-2us)) + λu² is stationary where u = s·σ(-2us)/λ.
    w, b = linear_probe.logistic_classifier(np.array([[-1.0], [1.0]]), np.array([0, 1]), 2, l2_reg=1.0)
    s = 1 / (1 + 1e-5)
    u = w[0, 1] / s  # W = W'/σ with σ = 1 + 1e-5
    np.testing.assert_allclose(w[0, 0], -w[0, 1], atol=1e-6)
    np.testing.assert_allclose(b, [0, 0], atol=1e-6)
    assert u == pytest.approx(s / (1 + math.exp(2 * u * s)), abs=1e-6)
    assert 0.3 < u < 0.4


# ----------------------------------------------------------------------------- class names and templates


def test_named_sets():
    imagenet = prompts.class_names("imagenet1k")
    assert len(imagenet) == 1000
    assert len(set(imagenet)) == 998  # CLIP's names repeat "missile" and "sunglasses"
    assert (imagenet[0], imagenet[1], imagenet[999]) == ("tench", "goldfish", "toilet paper")
    assert prompts.class_names("cifar10") == [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
    ]
    cifar100 = prompts.class_names("cifar100")
    assert len(cifar100) == 100 and len(set(cifar100)) == 100
    assert (cifar100[0], cifar100[1], cifar100[99]) == ("apple", "aquarium fish", "worm")
    assert [c.replace(" ", "_") for c in cifar100] == sorted(c.replace(" ", "_") for c in cifar100)  # label order
    t80, cifar, photo = prompts.templates("imagenet80"), prompts.templates("cifar"), prompts.templates("photo")
    assert (len(t80), len(set(t80)), len(cifar), photo) == (80, 80, 18, ["a photo of a {}."])
    assert (t80[0], cifar[0], cifar[-1]) == ("a bad photo of a {}.", "a photo of a {}.", "a photo of the big {}.")
    assert prompts.fill(t80[0], imagenet[0]) == "a bad photo of a tench."


def test_spec_files_and_errors(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("# my classes\n\n  red circle \nblue square\n")
    assert prompts.class_names(str(names)) == ["red circle", "blue square"]
    templates = tmp_path / "templates.txt"
    templates.write_text("# one\nan image of {}, a {}\n")
    assert prompts.fill(prompts.templates(str(templates))[0], "cat") == "an image of cat, a cat"
    with pytest.raises(UserError, match=r"cifar10, cifar100, imagenet1k.*path"):
        prompts.class_names("imagenet")
    with pytest.raises(UserError, match=r"cifar, imagenet80, photo.*path"):
        prompts.templates("imagenet81")
    templates.write_text("a photo of a cat.\n")
    with pytest.raises(UserError, match="placeholder"):
        prompts.templates(str(templates))
