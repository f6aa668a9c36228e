"""Evaluation metrics on hand-built cases."""
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.evals import captioning, retrieval, zeroshot


def test_zeroshot_marginalises_over_each_class_prompts():
    # One image, two classes with two prompts each, logit scale e^0 = 1: class 0 has
    # similarities {0.9, -0.9}, class 1 {0.5, 0.5}; p(class) ∝ Σ_prompts e^sim.
    image = np.array([[1.0, 0.0]])
    prompts = np.array([[0.9, np.sqrt(1 - 0.81)], [-0.9, np.sqrt(1 - 0.81)], [0.5, np.sqrt(0.75)], [0.5, -np.sqrt(0.75)]])
    log_p = zeroshot.class_log_probs(image, prompts, prompts_per_class=2, logit_scale=0.0)
    expected = np.log([np.exp(0.9) + np.exp(-0.9), 2 * np.exp(0.5)])
    expected -= np.log(np.exp(expected).sum())
    np.testing.assert_allclose(log_p[0], expected, rtol=1e-6)
    # At a sharp temperature the best single prompt decides: class 0 (0.9 > 0.5).
    sharp = zeroshot.class_log_probs(image, prompts, prompts_per_class=2, logit_scale=np.log(100))
    assert sharp[0].argmax() == 0
    np.testing.assert_allclose(np.exp(sharp).sum(axis=1), 1.0, rtol=1e-6)


def test_topk_accuracy():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    labels = np.array([2, 0])
    assert zeroshot.topk_accuracy(scores, labels, 1) == 0.5
    assert zeroshot.topk_accuracy(scores, labels, 2) == 1.0


def test_recall_counts_identical_captions_as_hits():
    # Items 0 and 1 share a caption; image 0's nearest text is text 1: a hit.
    images = np.eye(3)
    texts = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], float)
    result = retrieval.recall_at_k(images, texts, ["a", "a", "b"], ks=(1,))
    assert result["image_to_text_r@1"] == 1.0
    # With distinct captions the same ranking misses twice.
    result = retrieval.recall_at_k(images, texts, ["a", "b", "c"], ks=(1, 2))
    assert result["image_to_text_r@1"] == pytest.approx(1 / 3)
    assert result["image_to_text_r@2"] == 1.0
    assert retrieval.chance_recall_at_1(["a", "a", "b", "c"]) == pytest.approx((0.5 + 0.5 + 0.25 + 0.25) / 4)


def test_greedy_decode_follows_argmax_and_pads_after_eos():
    bos, eos, pad, vocab = 1, 2, 0, 6

    def logits_fn(tokens):
        # Row t predicts token (tokens[t] + 1) for row 0, so 1 -> 2 (EOS) at once; row 1
        # predicts 4 then EOS. Causal: depends only on tokens[:, t].
        nxt = jnp.where(jnp.arange(tokens.shape[0])[:, None] == 0, tokens + 1, jnp.where(tokens == 4, eos, 4))
        return jax_one_hot(nxt, vocab)

    out = captioning.greedy_decode(logits_fn, 2, 5, bos, eos, pad)
    np.testing.assert_array_equal(out, [[1, 2, 0, 0, 0], [1, 4, 2, 0, 0]])


def jax_one_hot(ids, vocab):
    return (ids[..., None] == jnp.arange(vocab)).astype(jnp.float32)


def test_caption_metrics():
    refs = ["two small red circles", "one large blue square"]
    perfect = captioning.caption_metrics(refs, refs)
    assert perfect["caption_exact_match"] == 1.0
    assert perfect["caption_bleu4"] == pytest.approx(1.0)
    result = captioning.caption_metrics(["two small red circles", "one large red square"], refs)
    assert result["caption_exact_match"] == 0.5
    assert 0.0 < result["caption_bleu4"] < 1.0
