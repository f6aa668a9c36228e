"""mmjax.evaluate and mmjax.predict on a tiny trained run: the trainer's numbers reproduced
from the workdir alone, images labelled and captioned, and one line per bad input."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import tiny_train_config
from mmjax import inference, metrics, train
from mmjax.evals import standalone
from mmjax.data import shapes
from mmjax.models import decoding


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step CoCa run evaluated at its end; -> (workdir, the trainer's final results)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    results = train.run(tiny_train_config(total_steps=2, eval_every=2, checkpoint_every=2), workdir)
    return workdir, results


def command(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600)


def test_the_workdir_holds_what_rebuilds_the_run(run):
    workdir, results = run
    assert {"config.json", "tokenizer.model", "eval_retrieval.png", "eval_captioning.png"} <= set(os.listdir(workdir))
    assert metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]["step"] == 2


def test_evaluate_reproduces_the_trainers_final_numbers(run):
    workdir, results = run
    config = train.run_record.load(workdir)[0]
    step, again, chance = standalone.evaluate(workdir, config)
    assert step == 2 and again.keys() == results.keys()
    for key in results:
        assert again[key] == pytest.approx(results[key], abs=1e-6), key
    assert chance["eval/zeroshot/top1"] == pytest.approx(1 / len(shapes.CLASS_NAMES))


def test_evaluate_command_prints_a_table_and_writes_json(run, tmp_path):
    workdir, results = run
    copy = str(tmp_path / "copy")  # the workdir alone, moved: nothing else is needed
    shutil.copytree(workdir, copy)
    result = command("mmjax.evaluate", f"--workdir={copy}", "--evals=retrieval,captioning", "--step=2",
                     "--config.evals.captioning.options.method=beam", "--config.evals.captioning.options.beam_size=2",
                     "--config.evals.extra.type=retrieval", "--config.evals.extra.limit=8")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.load(open(os.path.join(copy, "eval_2.json")))
    assert saved["step"] == 2
    assert set(saved["results"]) == {k for k in results if k.startswith(("eval/retrieval/", "eval/captioning/"))}
    for key, value in saved["results"].items():
        if key.startswith("eval/retrieval/"):
            assert value == pytest.approx(results[key], abs=1e-6), key
    assert "retrieval/image_to_text_r@1" in result.stdout and "captioning/cider" in result.stdout


def test_evaluate_adds_an_entry_from_the_command_line(run):
    workdir, _ = run
    config = train.run_record.load(workdir)[0]
    standalone.add_entries_named_in(config, ["--config.evals.few.type=retrieval"])
    assert config.evals.few.type == "retrieval" and tuple(config.evals.few.options.ks) == (1, 5, 10)


@pytest.mark.parametrize("args,words", [
    (["--step=7"], ["no checkpoint at step 7", "saved steps: 2"]),
    (["--evals=nope"], ["no evaluator named nope", "zeroshot"]),
    (["--config.evals.zeroshot.type=bogus"], ["unknown evals.zeroshot.type 'bogus'", "linear_probe"]),
    (["--config.evals.retrieval.data=csv:/nowhere/val.csv"], ["csv:/nowhere/val.csv", "no such file"]),
])
def test_evaluate_bad_input_is_one_line(run, args, words):
    result = command("mmjax.evaluate", f"--workdir={run[0]}", *args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for word in words:
        assert word in lines[0]


def test_evaluate_refuses_a_workdir_without_a_run(run, tmp_path):
    cases = {"missing": "does not exist", "empty": "config.json not found",
             "no_tokenizer": "tokenizer.model not found", "untrained": "has no checkpoint yet"}
    for name, files in (("empty", ()), ("no_tokenizer", ("config.json",)),
                        ("untrained", ("config.json", "tokenizer.model"))):  # a run that has not saved yet
        (tmp_path / name).mkdir()
        for file in files:
            shutil.copy(os.path.join(run[0], file), tmp_path / name / file)
    for name, words in cases.items():
        result = command("mmjax.evaluate", f"--workdir={tmp_path / name}")
        assert result.returncode == 2 and words in result.stderr and result.stderr.count("\n") == 1, result.stderr


def label_lines(stdout, path):
    """{label: probability} from the line after `path` in predict's output."""
    lines = stdout.splitlines()
    line = lines[lines.index(path) + 1]
    return {label.strip(): float(p) for label, p in re.findall(r"([a-z ]+?) (\d\.\d{3})", line)}


def test_predict_labels_captions_and_embeds_images(run, tmp_path):
    workdir, _ = run
    source = shapes.ShapesSource("eval", 4, 32, seed=0)
    images = np.stack([source[i]["image"] for i in range(2)])
    paths = [str(tmp_path / f"{i}.png") for i in range(2)]
    for image, path in zip(images, paths):
        Image.fromarray(image).save(path)  # lossless: predict reads these exact pixels
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"<html>not an image</html>")
    labels = ["red circle", "blue square", "green triangle"]
    out = tmp_path / "emb.npz"
    result = command("mmjax.predict", f"--workdir={workdir}", "--images", paths[0], str(broken), paths[1],
                     "--labels", ",".join(labels), "--caption", "--embed", str(out), "--texts", *labels)
    assert result.returncode == 2  # one image failed; the others were done
    assert result.stderr.strip() == f"error: {broken}: cannot be decoded as an image (not_an_image: unknown format); skipped"

    # The same numbers from the model rebuilt here, with the uncached decoder as the caption reference.
    loaded = inference.load(workdir)
    model, params, tok = loaded.model, loaded.params, loaded.tokenizer
    image_emb = np.asarray(model.apply({"params": params}, images, method=model.encode_image)[0])
    tokens = tok.encode(labels, loaded.config.data.text_len)[:, :-1]
    label_emb = np.asarray(model.apply({"params": params}, tokens, method=model.encode_text)[0])
    logits = np.exp(float(params["logit_scale"])) * image_emb @ label_emb.T
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    rows = decoding.caption(model, params, images, text_len=loaded.config.data.text_len, bos_id=tok.bos_id,
                            eos_id=tok.eos_id, pad_id=tok.pad_id, use_cache=False, num_tokens=tok.vocab_size)
    for i, (path, caption) in enumerate(zip(paths, tok.decode(rows))):
        shown = label_lines(result.stdout, path)
        np.testing.assert_allclose([shown[label] for label in labels], expected[i], atol=1e-3)
        assert f"{path}\n" in result.stdout and f"  caption: {caption}\n" in result.stdout
    saved = np.load(out)
    assert list(saved["images"]) == paths and list(saved["texts"]) == labels
    np.testing.assert_allclose(saved["image_embeddings"], image_emb, atol=1e-5)
    np.testing.assert_allclose(saved["text_embeddings"], label_emb, atol=1e-5)


def test_results_of_one_step_accumulate(tmp_path):
    path = str(tmp_path / "eval_5.json")
    standalone.write_results(path, 5, {"eval/a/top1": 0.5, "eval/b/r@1": 0.25})
    standalone.write_results(path, 5, {"eval/a/top1": 0.75})
    assert json.load(open(path)) == {"step": 5, "results": {"eval/a/top1": 0.75, "eval/b/r@1": 0.25}}
