"""Random-access sources (tfds:, csv:/jsonl:, folder:, shapes:) on tiny data built here."""
import concurrent.futures
import io
import json
import os
import pickle

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mmjax.data import shapes, sources
from mmjax.data.sources import base
from mmjax.errors import UserError
from tests import data_builders
from tests.data_builders import encoded


def data_cfg(**overrides):
    cfg = dict(tfds_data_dir="", image_key="", text_key="", image_size=32)
    return ml_collections.ConfigDict({**cfg, **overrides})


def write_image(path, value: int = 0, fmt: str = "PNG") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(encoded(value, fmt))


def decoded(image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image)))


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    data_builders.prepare_tfds(data_dir)
    return data_dir


def test_tfds_coco_layout_gives_five_captions(tfds_dir):
    source = sources.open_source("tfds:coco_captions", data_cfg(tfds_data_dir=tfds_dir))
    assert isinstance(source, base.RandomAccessSource)
    assert source.name == "tfds:coco_captions" and len(source) == 6 and source.class_names is None
    r = source[0]
    assert set(r) == {"key", "image", "captions", "label", "skip"}
    assert r["image"].dtype == np.uint8 and r["image"].shape == (5, 6, 3)  # decoded by tfds
    photo_id = int(r["key"].rpartition("#")[2])
    assert r["key"] == f"coco_captions:train#{photo_id}" and 100 <= photo_id < 106
    assert r["captions"] == [f"photo {photo_id} caption {j}".encode() for j in range(5)]
    assert r["label"] == -1 and r["skip"] == ""
    # the same index gives the same record, from this source and from a second one
    again = sources.open_source("tfds:coco_captions", data_cfg(tfds_data_dir=tfds_dir))[0]
    assert again["key"] == r["key"] and np.array_equal(again["image"], r["image"])
    assert sorted(source[i]["key"] for i in range(len(source))) == [f"coco_captions:train#{100 + i}" for i in range(6)]


def test_tfds_splits_configs_and_slices(tfds_dir):
    cfg = data_cfg(tfds_data_dir=tfds_dir, text_key="captions/text")
    assert len(sources.open_source("tfds:coco_captions/2014:val", cfg)) == 3
    sliced = sources.open_source("tfds:coco_captions:train[:4]", cfg)
    assert len(sliced) == 4 and sliced[3]["key"].startswith("coco_captions:train[:4]#")


def test_tfds_classification_layout(tfds_dir):
    source = sources.open_source("tfds:cifar10:test", data_cfg(tfds_data_dir=tfds_dir))
    assert source.class_names == ("airplane", "automobile", "bird")
    records = [source[i] for i in range(len(source))]
    assert sorted(r["key"] for r in records) == [f"cifar10:test#test_{i:05d}" for i in range(5)]
    for r in records:
        i = int(r["key"][-5:])
        assert r["label"] == i % 3 and r["captions"] == [] and r["image"][0, 0, 0] == i


def test_tfds_grayscale_img_and_text_fields(tfds_dir):
    source = sources.open_source("tfds:gray_digits", data_cfg(tfds_data_dir=tfds_dir))
    r = source[0]
    assert r["image"].shape == (5, 6, 1) and r["label"] == 7 and source.class_names is None
    assert r["captions"] in ([b"digit 0"], [b"digit 1"]) and r["key"] in ("gray_digits:train#0", "gray_digits:train#1")


def test_tfds_source_pickles_and_reads_from_threads(tfds_dir):
    source = sources.open_source("tfds:coco_captions", data_cfg(tfds_data_dir=tfds_dir))
    clone = pickle.loads(pickle.dumps(source))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        keys = list(pool.map(lambda i: clone[i % 6]["key"], range(48)))
    assert keys == [source[i % 6]["key"] for i in range(48)]


def test_tfds_errors(tfds_dir, tmp_path):
    with pytest.raises(UserError, match=r"'coco_captions' is not prepared under .*file_format='array_record'.*"
                                        r"--config.data.tfds_data_dir=DIR"):
        sources.open_source("tfds:coco_captions", data_cfg(tfds_data_dir=str(tmp_path)))
    with pytest.raises(UserError, match="'no_such_set' is neither in the TFDS catalog nor prepared"):
        sources.open_source("tfds:no_such_set", data_cfg(tfds_data_dir=tfds_dir))
    with pytest.raises(UserError, match=r"Unknown split 'validation'.*tfds:cifar10:SPLIT"):
        sources.open_source("tfds:cifar10:validation", data_cfg(tfds_data_dir=tfds_dir))
    with pytest.raises(UserError, match=r"no field 'caption_text' \(it has: captions, captions/id, captions/text, "
                                        r"image, image/id\).*--config.data.text_key"):
        sources.open_source("tfds:coco_captions", data_cfg(tfds_data_dir=tfds_dir, text_key="caption_text"))
    with pytest.raises(UserError, match="needs a dataset name"):
        sources.open_source("tfds:", data_cfg())


# --- csv: / jsonl: ---------------------------------------------------------------------------

@pytest.fixture
def table_dir(tmp_path):
    for name, value in (("a.png", 1), ("sub/b.jpg", 2)):
        write_image(str(tmp_path / "images" / name), value, "JPEG" if name.endswith("jpg") else "PNG")
    write_image(str(tmp_path / "elsewhere" / "c.png"), 3)
    return tmp_path


def test_csv_rows_paths_labels_and_skips(table_dir):
    elsewhere = str(table_dir / "elsewhere" / "c.png")
    (table_dir / "train.csv").write_text(
        "image,caption,label\n"
        "images/a.png,a red square,0\n"
        f'{elsewhere},"a caption, with a comma",1\n'
        "images/sub/b.jpg,,2\n"  # empty caption
        "images/gone.png,lost,3\n"  # no such file
        ",no image,\n", encoding="utf-8-sig")  # empty image cell; a BOM the reader drops
    source = sources.open_source(f"csv:{table_dir / 'train.csv'}", data_cfg())
    assert isinstance(source, base.RandomAccessSource) and len(source) == 5 and source.class_names is None
    r = source[0]
    assert r["key"] == str(table_dir / "images" / "a.png") and r["captions"] == ["a red square"]
    assert r["label"] == 0 and r["skip"] == "" and decoded(r["image"])[0, 0, 0] == 1
    assert source[1]["key"] == elsewhere and source[1]["captions"] == ["a caption, with a comma"]
    assert (source[2]["skip"], source[2]["image"], source[2]["label"]) == ("missing_caption", None, 2)
    assert (source[3]["skip"], source[3]["key"]) == ("missing_image", str(table_dir / "images" / "gone.png"))
    assert (source[4]["skip"], source[4]["key"]) == ("missing_image", f"{table_dir / 'train.csv'}:line 6")
    assert pickle.loads(pickle.dumps(source))[0] == r


def test_tsv_open_clip_columns_without_label(table_dir):
    (table_dir / "train.tsv").write_text("filepath\ttitle\nimages/a.png\ta, b and c\n")
    source = sources.open_source(f"csv:{table_dir / 'train.tsv'}", data_cfg())
    assert source[0]["captions"] == ["a, b and c"] and source[0]["label"] == -1


def test_table_column_overrides(table_dir):
    (table_dir / "t.csv").write_text("img_path,alt,caption\nimages/a.png,alt text,other\n")
    source = sources.open_source(f"csv:{table_dir / 't.csv'}", data_cfg(image_key="img_path", text_key="alt"))
    assert source[0]["captions"] == ["alt text"] and source[0]["skip"] == ""


def test_jsonl_caption_lists_and_malformed_lines(table_dir):
    lines = [json.dumps({"image": "images/a.png", "caption": ["one", "two"], "label": 4}),
             "",  # blank lines are not rows
             "{not json",
             "[1, 2]",  # valid JSON, not an object
             json.dumps({"image": "images/sub/b.jpg", "caption": "three"})]
    (table_dir / "train.jsonl").write_text("\n".join(lines) + "\n")
    source = sources.open_source(f"jsonl:{table_dir / 'train.jsonl'}", data_cfg())
    assert len(source) == 4
    assert source[0]["captions"] == ["one", "two"] and source[0]["label"] == 4
    for index, line in ((1, 3), (2, 4)):
        assert source[index] == base.record(f"{table_dir / 'train.jsonl'}:line {line}", skip="missing_caption")
    assert source[3]["captions"] == ["three"] and source[3]["label"] == -1
    assert decoded(source[3]["image"])[0, 0, 0] in range(0, 6)  # JPEG: close to 2


def test_table_errors(table_dir):
    with pytest.raises(UserError, match="no such file"):
        sources.open_source(f"csv:{table_dir / 'absent.csv'}", data_cfg())
    (table_dir / "cols.csv").write_text("url,alt\nx.png,y\n")
    with pytest.raises(UserError, match=r"no field 'image' or 'filepath' or 'file' or 'path' \(it has: alt, url\)"
                                        r".*--config.data.image_key"):
        sources.open_source(f"csv:{table_dir / 'cols.csv'}", data_cfg())
    with pytest.raises(UserError, match=r"no field 'caption' or 'title' or 'text'.*--config.data.text_key"):
        sources.open_source(f"csv:{table_dir / 'cols.csv'}", data_cfg(image_key="url"))
    (table_dir / "urls.csv").write_text("url,caption\nhttps://example.com/x.jpg,y\n")
    with pytest.raises(UserError, match="holds URLs"):
        sources.open_source(f"csv:{table_dir / 'urls.csv'}", data_cfg(image_key="url"))
    (table_dir / "label.csv").write_text("image,caption,label\na.png,x,cat\n")
    with pytest.raises(UserError, match=r"label.csv:line 2: label 'cat' is not an integer"):
        sources.open_source(f"csv:{table_dir / 'label.csv'}", data_cfg())
    (table_dir / "bad.jsonl").write_text("nope\n")
    with pytest.raises(UserError, match="no line is a JSON object"):
        sources.open_source(f"jsonl:{table_dir / 'bad.jsonl'}", data_cfg())
    (table_dir / "latin1.csv").write_bytes("image,caption\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        sources.open_source(f"csv:{table_dir / 'latin1.csv'}", data_cfg())
    (table_dir / "empty.csv").write_text("image,caption\n")
    with pytest.raises(UserError, match="no rows"):
        sources.open_source(f"csv:{table_dir / 'empty.csv'}", data_cfg())


# --- folder: ---------------------------------------------------------------------------------

def test_folder_classes_labels_and_captions(tmp_path):
    write_image(str(tmp_path / "tabby_cat" / "x.jpeg"), 5, "JPEG")
    write_image(str(tmp_path / "golden_retriever" / "b.PNG"), 2)
    write_image(str(tmp_path / "golden_retriever" / "a.png"), 1)
    write_image(str(tmp_path / "golden_retriever" / "more" / "c.png"), 3)
    (tmp_path / "golden_retriever" / "notes.txt").write_text("not an image")
    (tmp_path / "zebra").mkdir()  # a class without images keeps its index
    (tmp_path / ".cache").mkdir()
    source = sources.open_source(f"folder:{tmp_path}", data_cfg())
    assert isinstance(source, base.RandomAccessSource)
    assert source.class_names == ("golden_retriever", "tabby_cat", "zebra")
    assert [source[i]["key"] for i in range(len(source))] == [
        "golden_retriever/a.png", "golden_retriever/b.PNG", "golden_retriever/more/c.png", "tabby_cat/x.jpeg"]
    r = source[1]
    assert r["captions"] == ["golden retriever"] and r["label"] == 0 and decoded(r["image"])[0, 0, 0] == 2
    assert source[3]["label"] == 1 and source[3]["captions"] == ["tabby cat"]
    os.remove(tmp_path / "tabby_cat" / "x.jpeg")
    clone = pickle.loads(pickle.dumps(source))
    assert (clone[3]["skip"], clone[3]["image"]) == ("missing_image", None)


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        sources.open_source(f"folder:{tmp_path / 'absent'}", data_cfg())
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no class folders with images"):
        sources.open_source(f"folder:{tmp_path}", data_cfg())


# --- shapes: ---------------------------------------------------------------------------------

def test_shapes_records():
    train = sources.open_source("shapes", data_cfg())
    evals = sources.open_source("shapes:eval", data_cfg(image_size=24))
    assert isinstance(train, base.RandomAccessSource)
    assert (len(train), len(evals)) == (1_000_000, 10_000)
    assert train.class_names == shapes.CLASS_NAMES and len(train.zeroshot_prompts) == 24
    assert train.zeroshot_prompts[5] == shapes.zeroshot_prompts(5)
    r = evals[7]
    raw = shapes.ShapesSource("eval", 10_000, 24)[7]
    assert r["key"] == "shapes:eval#7" and r["captions"] == [raw["caption"]] and r["label"] == raw["label"]
    assert r["image"].shape == (24, 24, 3) and np.array_equal(r["image"], raw["image"]) and r["skip"] == ""
    assert np.array_equal(pickle.loads(pickle.dumps(train))[3]["image"], train[3]["image"])


def test_shapes_errors():
    with pytest.raises(UserError, match="unknown shapes split 'test'; valid splits: train, eval"):
        sources.open_source("shapes:test", data_cfg())
    with pytest.raises(UserError, match="image_size to 24 or more"):
        sources.open_source("shapes", data_cfg(image_size=16))
