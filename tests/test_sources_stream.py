"""Tests for the streamed sources: webdataset tars (wds:) and parquet files (parquet:)."""
import io
import json
import os
import pickle
import tarfile
import types

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmjax.data import sources
from mmjax.data.sources import base
from mmjax.errors import UserError

CFG = types.SimpleNamespace(image_key="", text_key="")


def encode(seed: int, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def write_tar(path, members) -> str:
    """members: (name, bytes) pairs; bytes None makes a directory."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def sample(key: str, seed: int, fmt: str = "jpg") -> list:
    image = encode(seed, "PNG" if fmt == "png" else "JPEG")
    return [(f"{key}.{fmt}", image), (f"{key}.txt", f"a caption of {key}".encode())]


def records(dataset) -> list:
    return list(iter(dataset))


def assert_resumes_everywhere(dataset) -> list:
    """A fresh iterator restored from the state after record k yields exactly records k+1, ..."""
    expected = records(dataset)
    iterator = iter(dataset)
    for k in range(len(expected) + 1):
        state = json.loads(json.dumps(iterator.get_state()))
        restored = iter(dataset)
        restored.set_state(state)
        assert list(restored) == expected[k:], f"resumed after record {k}"
        if k < len(expected):
            assert next(iterator) == expected[k]
    return expected


@pytest.fixture
def wds_dir(tmp_path):
    """3 shards of 3 samples; shard 1 has long keys (pax headers) and png images."""
    for s in range(3):
        members = []
        for i in range(3):
            key = f"{s:05d}{i:04d}" if s != 1 else f"{'d' * 120}/{s:05d}{i:04d}"
            members += sample(key, 10 * s + i, "png" if s == 1 else "jpg")
        write_tar(tmp_path / f"{s:05d}.tar", members)
    (tmp_path / "notes.txt").write_text("not a shard")
    return tmp_path


def expected_wds(s: int) -> list:
    out = []
    for i in range(3):
        key = f"{s:05d}{i:04d}" if s != 1 else f"{'d' * 120}/{s:05d}{i:04d}"
        image = encode(10 * s + i, "PNG" if s == 1 else "JPEG")
        out.append(base.record(key, image, [f"a caption of {key}".encode()]))
    return out


# --- webdataset ---------------------------------------------------------------------------

def test_wds_patterns_expand_to_sorted_unique_files(wds_dir):
    shards = [str(wds_dir / f"{s:05d}.tar") for s in range(3)]
    for pattern in ("{00000..00002}.tar", "*.tar", "0000{2,0,1}.tar", "{*,00001}.tar", "{00000..00001}.tar"):
        source = sources.open_source(f"wds:{wds_dir}/{pattern}", CFG)
        assert source.name == f"wds:{wds_dir}/{pattern}" and source.class_names is None
        assert isinstance(source, base.StreamSource)
        assert source.shards == (shards[:2] if pattern.startswith("{00000..00001}") else shards), pattern


def test_wds_records_in_order(wds_dir):
    source = sources.open_source(f"wds:{wds_dir}/*.tar", CFG)
    for s, shard in enumerate(source.shards):
        assert records(source.shard_dataset(shard)) == expected_wds(s)


def test_wds_pattern_matching_nothing_names_pattern_and_fix(tmp_path):
    with pytest.raises(UserError, match=r"wds pattern '.*/\{0..3\}.tar' matches no file; check the path"):
        sources.open_source(f"wds:{tmp_path}/{{0..3}}.tar", CFG)
    with pytest.raises(UserError, match="unbalanced braces"):
        sources.open_source(f"wds:{tmp_path}/{{0..3.tar", CFG)


def test_wds_resumes_exactly_from_every_record(wds_dir):
    source = sources.open_source(f"wds:{wds_dir}/*.tar", CFG)
    for s, shard in enumerate(source.shards):
        assert assert_resumes_everywhere(source.shard_dataset(shard)) == expected_wds(s)


def test_wds_missing_members_and_unknown_members(tmp_path):
    bad_utf8 = b"caf\xe9 \xff"
    members = (
        [("dir", None), ("__meta__", b"no extension"), ("x.json", b"{}")]
        + sample("a", 1)
        + [("a.json", b"{}"), ("a.seg.png", b"mask"), ("b.png", encode(2, "PNG")), ("b.cls", b"3")]
        + [("c.txt", b"only text")]
        + [("d.JPG", encode(4)), ("d.txt", bad_utf8), ("d.webp", b"second image, ignored")]
        + sample("e", 5)
    )
    got = assert_resumes_everywhere(source_dataset(write_tar(tmp_path / "t.tar", members)))
    assert [(r["key"], r["skip"]) for r in got] == [
        ("a", ""), ("b", "missing_caption"), ("c", "missing_image"), ("d", ""), ("e", "")
    ]
    assert got[0] == base.record("a", encode(1), [b"a caption of a"])
    assert got[1]["image"] == encode(2, "PNG") and got[1]["captions"] == []
    assert got[2]["image"] is None and got[2]["captions"] == [b"only text"]
    assert got[3]["image"] == encode(4) and got[3]["captions"] == [bad_utf8]  # decoded (and reported) later


def source_dataset(path):
    return sources.open_source(f"wds:{path}", CFG).shard_dataset(path)


def test_wds_split_key_across_shards(tmp_path):
    first = write_tar(tmp_path / "0.tar", sample("a", 1) + [("k.jpg", encode(2))])
    second = write_tar(tmp_path / "1.tar", [("k.txt", b"the caption")] + sample("b", 3))
    assert [(r["key"], r["skip"]) for r in records(source_dataset(first))] == [("a", ""), ("k", "split_key")]
    got = records(source_dataset(second))
    assert [(r["key"], r["skip"]) for r in got] == [("k", "split_key"), ("b", "")]
    assert got[0]["captions"] == [b"the caption"]


def member_offsets(path) -> dict:
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


@pytest.mark.parametrize("cut_in", ["c.jpg", "c.txt"])
def test_wds_truncated_final_member(tmp_path, cut_in):
    path = write_tar(tmp_path / "t.tar", sample("a", 1) + sample("b", 2) + sample("c", 3))
    with open(path, "r+b") as f:
        f.truncate(member_offsets(path)[cut_in][1] + 5)
    got = assert_resumes_everywhere(source_dataset(path))
    assert [(r["key"], r["skip"]) for r in got] == [("a", ""), ("b", ""), ("c", "truncated_shard")]


@pytest.mark.parametrize(
    "garbage_at, before", [("b.jpg", [("a", "")]), ("b.txt", [("a", ""), ("b", "missing_caption")])]
)
def test_wds_garbage_header_mid_file_stops_the_shard(tmp_path, garbage_at, before):
    path = write_tar(tmp_path / "t.tar", sample("a", 1) + sample("b", 2) + sample("c", 3))
    offset = member_offsets(path)[garbage_at][0]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\x8b garbage \x00" * 40)
    got = assert_resumes_everywhere(source_dataset(path))
    assert [(r["key"], r["skip"]) for r in got] == before + [(f"{path}@{offset}", "truncated_shard")]


def test_wds_empty_or_cut_shards_never_raise(tmp_path):
    path = write_tar(tmp_path / "t.tar", sample("a", 1) + sample("b", 2))
    data = open(path, "rb").read()
    end = member_offsets(path)["b.txt"][1] + 512  # where the end-of-archive zero blocks start
    for size in [0, 100, 511, 512, 513] + list(range(700, end, 97)) + [end - 1]:
        cut = tmp_path / f"cut{size}.tar"
        cut.write_bytes(data[:size])
        got = assert_resumes_everywhere(source_dataset(str(cut)))
        assert got[-1]["skip"] == "truncated_shard", size


# --- parquet ------------------------------------------------------------------------------

def write_parquet(path, columns: dict, row_group_size: int = 2) -> str:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return str(path)


@pytest.fixture
def img2dataset_parquet(tmp_path):
    images = [encode(i) for i in range(5)]
    images[3] = None
    captions = [f"caption {i}" for i in range(5)]
    captions[1] = None
    return write_parquet(tmp_path / "part-0.parquet", {
        "key": [f"{i:09d}" for i in range(5)],
        "url": [f"http://x/{i}" for i in range(5)],
        "caption": captions,
        "jpg": pa.array(images, pa.binary()),
        "width": [16] * 5,
    })


def test_parquet_img2dataset_rows_and_resume(img2dataset_parquet, tmp_path):
    source = sources.open_source(f"parquet:{tmp_path}/*.parquet", CFG)
    assert isinstance(source, base.StreamSource) and source.shards == [img2dataset_parquet]
    got = assert_resumes_everywhere(source.shard_dataset(img2dataset_parquet))
    assert [(r["key"], r["skip"]) for r in got] == [
        ("000000000", ""), ("000000001", "missing_caption"), ("000000002", ""),
        ("000000003", "missing_image"), ("000000004", ""),
    ]
    assert got[0] == base.record("000000000", encode(0), ["caption 0"])


def test_parquet_hf_image_struct_and_text(tmp_path):
    image = pa.array([{"bytes": encode(i, "PNG"), "path": f"{i}.png"} for i in range(7)])
    path = write_parquet(tmp_path / "hf.parquet", {"image": image, "text": [f"t{i}" for i in range(7)]}, 3)
    source = sources.open_source(f"parquet:{path}", CFG)
    assert (source.image_column, source.caption_column) == ("image", "text")
    got = assert_resumes_everywhere(source.shard_dataset(path))
    assert got == [base.record(f"{path}#{i}", encode(i, "PNG"), [f"t{i}"]) for i in range(7)]


def test_parquet_config_keys_and_missing_columns(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", {"pixels": [encode(0)], "alt": ["hi"]})
    cfg = types.SimpleNamespace(image_key="pixels", text_key="alt")
    got = records(sources.open_source(f"parquet:{path}", cfg).shard_dataset(path))
    assert got == [base.record(f"{path}#0", encode(0), ["hi"])]
    with pytest.raises(UserError, match=r"p.parquet has no field 'jpg' or 'image' .*\(it has: alt, pixels\); "
                       r"name the right one with --config.data.image_key=NAME"):
        sources.open_source(f"parquet:{path}", CFG)
    with pytest.raises(UserError, match=r"no field 'title' \(it has: alt, pixels\); .*--config.data.text_key"):
        sources.open_source(f"parquet:{path}", types.SimpleNamespace(image_key="pixels", text_key="title"))
    (tmp_path / "not.parquet").write_text("hello")
    with pytest.raises(UserError, match="cannot read the parquet schema of .*not.parquet"):
        sources.open_source(f"parquet:{tmp_path}/not.parquet", CFG)
    with pytest.raises(UserError, match="parquet pattern .* matches no file"):
        sources.open_source(f"parquet:{tmp_path}/*.tar", CFG)


def test_parquet_cut_file_is_reported_not_raised(img2dataset_parquet, tmp_path):
    source = sources.open_source(f"parquet:{img2dataset_parquet}", CFG)
    data = open(img2dataset_parquet, "rb").read()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[: len(data) // 2])
    got = assert_resumes_everywhere(source.shard_dataset(str(cut)))
    assert [r["skip"] for r in got] == ["truncated_shard"]


# --- both: pickling and interleaving ------------------------------------------------------

def test_datasets_pickle_and_interleave_resumes_exactly(wds_dir, img2dataset_parquet, tmp_path):
    for source in (
        sources.open_source(f"wds:{wds_dir}/*.tar", CFG),
        sources.open_source(f"parquet:{tmp_path}/*.parquet", CFG),
    ):
        source = pickle.loads(pickle.dumps(source))
        for shard in source.shards:
            dataset = source.shard_dataset(shard)
            assert records(pickle.loads(pickle.dumps(dataset))) == records(dataset)
        mixed = grain.experimental.InterleaveIterDataset(
            grain.MapDataset.source(source.shards).map(source.shard_dataset), cycle_length=2
        )
        mixed = pickle.loads(pickle.dumps(mixed))
        every = [r for shard in source.shards for r in records(source.shard_dataset(shard))]
        got = records(mixed)
        assert sorted(r["key"] for r in got) == sorted(r["key"] for r in every)
        grain.experimental.assert_equal_output_after_checkpoint(mixed)


def test_finished_iterators_close_their_files(wds_dir, img2dataset_parquet, tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    iterators = []  # kept alive so that only an explicit close frees their files
    for spec in (f"wds:{wds_dir}/*.tar", f"parquet:{tmp_path}/*.parquet"):
        source = sources.open_source(spec, CFG)
        iterators += [iter(source.shard_dataset(shard)) for shard in source.shards]
    assert len(os.listdir("/proc/self/fd")) > before
    for iterator in iterators:
        list(iterator)
    assert len(os.listdir("/proc/self/fd")) <= before
