"""`tfds:NAME[/CONFIG][:SPLIT]`: a prepared TFDS dataset, read by index from its ArrayRecord files.

The builder comes from the prepared files (dataset_info.json, features.json), never from the
catalog's code: tfds.data_source() instantiates the catalog builder, and constructing many of
those (coco_captions among them) needs TensorFlow. So reading needs no TensorFlow; only
preparing does, once, elsewhere.
"""
from __future__ import annotations

import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder, registered

from mmjax.data.sources import base
from mmjax.errors import UserError

IMAGE_FEATURES = ("image", "img")
# coco_captions keeps its 5 captions as captions/text; label-only sets (cifar10) have none.
CAPTION_FEATURES = ("captions/text", "captions", "caption", "text")
ID_FEATURES = ("image/id", "id")


class TfdsSource:
    def __init__(self, name: str, split: str, data_cfg):
        self.name = f"tfds:{name}:{split}"
        where = f"tfds dataset {name!r}"
        builder = _builder(name, data_cfg.tfds_data_dir)
        try:
            self._data = builder.as_data_source(split=split)
        except NotImplementedError:
            raise UserError(f"{where} under {builder.data_dir} is prepared as {builder.info.file_format.value}, "
                            "which has no random access; prepare it again with "
                            "download_and_prepare(file_format='array_record')") from None
        except ValueError as e:  # an unknown split, or bad slicing syntax
            raise UserError(f"{where}: {str(e).splitlines()[0]} Write tfds:{name}:SPLIT with one of its "
                            "splits (slices like train[:1000] work too)") from None
        features = builder.info.features
        paths = _feature_paths(features)
        self._image = paths[base.pick_field(paths, data_cfg.image_key, IMAGE_FEATURES, "image_key", where)]
        caption = base.pick_field(paths, data_cfg.text_key, CAPTION_FEATURES, "text_key", where, required=False)
        self._captions = paths[caption] if caption else None
        self._id = next((paths[f] for f in ID_FEATURES if f in paths), None)
        label = features["label"] if "label" in features else None
        self._has_label = label is not None and label.shape == ()  # a class index, not e.g. a box list
        self.class_names = tuple(label.names) if isinstance(label, tfds.features.ClassLabel) else None
        self._key_prefix = f"{name}:{split}#"

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> dict:
        example = self._data[index]  # decoded: images as uint8 [H, W, C], text as bytes
        captions = _get(example, self._captions) if self._captions else []
        if isinstance(captions, (str, bytes)):
            captions = [captions]
        key_id = _get(example, self._id) if self._id else index
        key = self._key_prefix + (key_id.decode() if isinstance(key_id, bytes) else str(key_id))
        return base.record(key, _get(example, self._image), list(captions),
                           example["label"] if self._has_label else -1)


def _builder(name: str, data_dir: str):
    try:
        return read_only_builder.builder_from_files(name, data_dir=data_dir or None)
    except registered.DatasetNotFoundError:
        pass
    where = data_dir or tfds.core.constants.get_default_data_dir()
    if name.split("/")[0] not in tfds.list_builders(with_community_datasets=False):
        raise UserError(f"tfds dataset {name!r} is neither in the TFDS catalog nor prepared under {where}; "
                        "check the name (tfds:NAME[/CONFIG][:SPLIT]) or --config.data.tfds_data_dir")
    raise UserError(
        f"tfds dataset {name!r} is not prepared under {where}; prepare it once where TensorFlow is installed "
        f"(`pip install tensorflow tensorflow-datasets && python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder('{name}', data_dir=DIR).download_and_prepare(file_format='array_record')\"`) "
        "and pass --config.data.tfds_data_dir=DIR")


def _feature_paths(features, prefix: tuple = ()) -> dict[str, tuple]:
    """Every feature as "a/b" -> the keys that reach it in a decoded example. A flat key may
    itself hold a slash (coco's "image/id"); a nested dict or a sequence of dicts adds a level."""
    paths = {}
    for key, feature in features.items():
        keys = prefix + (key,)
        paths["/".join(keys)] = keys
        inner = feature.feature if isinstance(feature, tfds.features.Sequence) else feature
        if isinstance(inner, tfds.features.FeaturesDict):
            paths.update(_feature_paths(inner, keys))
    return paths


def _get(example: dict, keys: tuple):
    for key in keys:
        example = example[key]
    return example


def open_source(scheme: str, argument: str, data_cfg) -> TfdsSource:
    name, _, split = argument.partition(":")
    if not name:
        raise UserError("tfds: needs a dataset name; write tfds:NAME[/CONFIG][:SPLIT], e.g. tfds:cifar10:test")
    return TfdsSource(name, split or "train", data_cfg)
