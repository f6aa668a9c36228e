"""config.evals: evaluators take prediction functions (here fakes with known answers), read
their splits grouped by image, and the sharded prediction functions count a tail once."""
import csv
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from data_builders import jpeg_bytes, write_folders
from helpers import tiny_model_config, tiny_train_config
from mmjax import evals
from mmjax.data import pipeline
from mmjax.data.tokenizer import Tokenizer, train as train_tokenizer
from mmjax.evals import datasets
from mmjax.evals.predictor import Predictions, Predictor
from mmjax.models import build_model
from mmjax.parallel import sharding


def one_hot(index, size=8):
    v = np.zeros(size, np.float32)
    v[index] = 1.0
    return v


def fake_predictions(image_vector, text_vector, captions=None):
    """Embeddings from each image's first pixel value and from each text, by hand."""
    return Predictions(
        embed_images=lambda images: np.stack([image_vector(int(im[0, 0, 0])) for im in images]),
        embed_texts=lambda texts: np.stack([text_vector(t) for t in texts]),
        caption=(lambda images, options, seed: [captions[int(im[0, 0, 0])] for im in images]) if captions else None,
        logit_scale=0.0,
        logit_bias=None,
    )


def eval_set(labels, texts, text_image, class_names=None):
    images = np.zeros((len(labels), 4, 4, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(len(labels))  # the image's index, for the fakes
    return datasets.EvalSet("fake", images, np.asarray(labels, np.int32), list(texts),
                            np.asarray(text_image, np.int32), class_names, None, {})


class FixedContext(evals.Context):
    def __init__(self, split, has_decoder=True):
        super().__init__(tiny_train_config(), has_decoder)
        self.split = split

    def dataset(self, entry):
        return self.split

    def load(self, spec, limit):
        return self.split


def test_zeroshot_clip_protocol_on_known_embeddings():
    # Classes a, b, c; images 0-3 with labels 0, 1, 2, 2 look like classes 0, 1, 1, 2.
    split = eval_set([0, 1, 2, 2], [], [], class_names=["a", "b", "c"])
    seen_as = [0, 1, 1, 2]
    evaluator = evals.module("zeroshot").Evaluator("zs", evals.entry("zeroshot", templates="photo"), FixedContext(split))
    assert evaluator.prompts == [["a photo of a a."], ["a photo of a b."], ["a photo of a c."]]
    predict = fake_predictions(lambda i: one_hot(seen_as[i]), lambda t: one_hot("abc".index(t[-2])))
    result = evaluator.run(predict)
    assert result == {"top1": 0.75, "mean_per_class_recall": pytest.approx((1 + 1 + 0.5) / 3)}
    assert evaluator.chance() == {"top1": pytest.approx(1 / 3), "mean_per_class_recall": pytest.approx(1 / 3)}


def test_zeroshot_skips_a_split_without_classes():
    split = eval_set([-1, -1], ["x", "y"], [0, 1])
    with pytest.raises(evals.Unavailable, match="no class labels"):
        evals.module("zeroshot").Evaluator("zs", evals.entry("zeroshot"), FixedContext(split))


def test_retrieval_counts_positives_by_image():
    # Image 0 has captions 0, 1; image 1 has 2; image 2 has 3. Texts 1 and 3 read the same.
    split = eval_set([-1] * 3, ["t0", "t1", "t2", "t1"], [0, 0, 1, 2])
    text_vectors = {"t0": one_hot(0), "t1": one_hot(1), "t2": one_hot(2)}
    image_vectors = [one_hot(1), one_hot(0), one_hot(1)]  # image 1 looks like caption t0: wrong
    evaluator = evals.module("retrieval").Evaluator("r", evals.entry("retrieval", ks=(1,)), FixedContext(split))
    result = evaluator.run(fake_predictions(lambda i: image_vectors[i], lambda t: text_vectors[t]))
    # image→text: image 0's best is t1 (its own) ✓; image 1's best is t0 (image 0's) ✗; image 2's
    # best are t1 and its own t1, tied: the positive wins ties ✓.
    assert result["image_to_text_r@1"] == pytest.approx(2 / 3)
    # text→image: t0 -> image 1 ✗; t1 (image 0) ties images 0 and 2 ✓; t2 -> none scores, all tie ✓;
    # t1 (image 2) ✓.
    assert result["text_to_image_r@1"] == pytest.approx(3 / 4)


def test_captioning_scores_against_every_reference(tmp_path):
    split = eval_set([-1, -1], ["a red circle", "one red circle", "a blue square"], [0, 0, 1])
    evaluator = evals.module("captioning").Evaluator("c", evals.entry("captioning"), FixedContext(split))
    predict = fake_predictions(lambda i: one_hot(i), lambda t: one_hot(0), captions=["one red circle", "a square"])
    result = evaluator.run(predict)
    assert result["exact_match"] == 0.5
    from mmjax.evals import caption_metrics

    expected = caption_metrics.caption_scores(["one red circle", "a square"],
                                              [["a red circle", "one red circle"], ["a blue square"]])
    assert result["bleu4"] == expected["bleu4"] and result["cider"] == expected["cider"]
    assert evaluator.samples == [("a red circle", "one red circle"), ("a blue square", "a square")]
    evaluator.draw(str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 0


def test_captioning_needs_a_decoder():
    split = eval_set([-1], ["x"], [0])
    with pytest.raises(evals.Unavailable, match="decoder"):
        evals.module("captioning").Evaluator("c", evals.entry("captioning"), FixedContext(split, has_decoder=False))


def test_linear_probe_on_separable_features():
    labels = [0, 1, 2, 0, 1, 2, 0, 1, 2]
    split = eval_set(labels, [], [])
    entry = evals.entry("linear_probe", train_data="shapes:eval", shots=(1, 2), full=True)
    evaluator = evals.module("linear_probe").Evaluator("p", entry, FixedContext(split))
    # Every dimension informative: big_vision's whitening scales a pure-noise one up to the signal's size.
    result = evaluator.run(fake_predictions(lambda i: one_hot(labels[i], 3) * (1 + 0.01 * i), lambda t: one_hot(0)))
    assert result == {"1shot_top1": 1.0, "2shot_top1": 1.0, "full_top1": 1.0}


def test_a_split_groups_the_records_of_one_image(tmp_path):
    """A COCO-style table repeats an image's path on each caption's row."""
    (tmp_path / "images").mkdir()
    rows = []
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(jpeg_bytes(colour, seed=i))
        rows += [{"filepath": f"images/{i}.jpg", "title": f"caption {j} of image {i}"} for j in range(3)]
    rows.append({"filepath": "images/missing.jpg", "title": "no such file"})
    with open(tmp_path / "val.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "title"])
        writer.writeheader()
        writer.writerows(rows)
    data_cfg = pipeline.default_data_config()
    split = datasets.load(f"csv:{tmp_path}/val.csv", data_cfg)
    assert split.images.shape == (2, 32, 32, 3)
    assert split.text_image.tolist() == [0, 0, 0, 1, 1, 1]
    assert split.references()[1] == [f"caption {j} of image 1" for j in range(3)]
    assert split.skipped == {"missing_image": 1}


def test_folder_split_has_classes(tmp_path):
    split = datasets.load(f"folder:{write_folders(tmp_path, 2)}", pipeline.default_data_config())
    assert split.class_names == ["blue", "green", "red", "yellow"] and sorted(split.labels) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_evaluators_run_at_their_cadence_and_log_under_their_prefix(tmp_path):
    config = tiny_train_config()
    config.eval_every = 4
    config.evals.retrieval.every = 2
    config.evals.zeroshot.prefix = "val/"
    scheduled = evals.build(config, has_decoder=True)
    assert [(s.name, s.every, s.prefix) for s in scheduled] == [  # ConfigDict keys come sorted
        ("captioning", 4, "eval/captioning/"), ("retrieval", 2, "eval/retrieval/"), ("zeroshot", 4, "val/")]
    assert [s.name for s in scheduled if s.due(2, final=False)] == ["retrieval"]
    assert len({id(s.evaluator.data) for s in scheduled}) == 1  # one copy of the split they share


def test_an_uneven_tail_counts_once_on_one_device_and_on_eight():
    texts = [f"caption number {i}" for i in range(40)]
    tok = Tokenizer(train_tokenizer(texts, 48))
    model = build_model(tiny_model_config(), tok.vocab_size, tok.pad_id, contrastive="clip")
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8), jnp.zeros((1, 7), jnp.int32))
    params = nn.unbox(params["params"])
    images = np.random.default_rng(0).integers(0, 255, (13, 32, 32, 3), np.uint8)
    outputs = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)), devices)
        shardings = jax.tree.map(lambda _: sharding.replicated(mesh), params)
        predict = Predictor(model, tok, 8, mesh, shardings, batch_size=5).bind(params)
        outputs.append((predict.embed_images(images), predict.embed_texts(texts[:13])))
    for one, eight in zip(*outputs):
        assert one.shape == eight.shape == (13, 32)
        np.testing.assert_allclose(one, eight, rtol=1e-5, atol=1e-6)
    direct = model.apply({"params": params}, images, method=model.encode_image)[0]
    np.testing.assert_allclose(outputs[0][0], direct, rtol=1e-5, atol=1e-6)



def test_a_shared_split_is_embedded_once_per_round():
    split = eval_set([0, 1, 2, 2], ["a", "b", "c", "c"], [0, 1, 2, 3], class_names=["a", "b", "c"])
    context = FixedContext(split)
    scheduled = [evals.Scheduled(kind, evals.entry(kind), evals.module(kind).Evaluator(kind, evals.entry(kind), context), 1)
                 for kind in ("zeroshot", "retrieval")]
    calls = []
    predict = fake_predictions(lambda i: one_hot(i), lambda t: one_hot("abc".index(t[-2] if len(t) > 1 else t)))
    counted = dataclasses.replace(predict, embed_images=lambda images: calls.append(1) or predict.embed_images(images))
    evals.run(scheduled, counted, step=1, final=False, workdir=None)
    assert len(calls) == 1
