"""Dataset readers (Karpathy JSON, CSV/JSONL), their one-line errors, and the shapes generator."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from rcsr_ray.cli import main
from rcsr_ray.data.readers import DatasetError, read_dataset
from rcsr_ray.data.shapes import COLOURS, POSITIONS, make_shapes_dataset


def _sent(*raws):
    return [{"raw": r, "tokens": r.split()} for r in raws]


KARPATHY_COCO = {"dataset": "coco", "images": [
    {"filepath": "train2014", "filename": "a.jpg", "split": "train", "sentences": _sent("a dog", "a brown dog")},
    {"filepath": "val2014", "filename": "b.jpg", "split": "val", "sentences": _sent("a cat")},
    {"filepath": "val2014", "filename": "c.jpg", "split": "test",
     "sentences": _sent("two birds", "birds on a wire", "a wire")},
    {"filepath": "val2014", "filename": "d.jpg", "split": "restval", "sentences": _sent("a car", "a red car")},
]}


def _write(path, doc):
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def test_karpathy_coco_splits_paths_and_captions(tmp_path):
    _write(tmp_path / "dataset_coco.json", KARPATHY_COCO)
    data = read_dataset("coco", tmp_path)  # annotation file found in the root by default
    assert data.paths == ["train2014/a.jpg", "val2014/b.jpg", "val2014/c.jpg", "val2014/d.jpg"]
    assert data.splits == ["train", "val", "test", "train"]  # restval folds into train
    assert data.captions == ["a dog", "a brown dog", "a cat", "two birds", "birds on a wire", "a wire", "a car",
                             "a red car"]
    assert data.caption_image.tolist() == [0, 0, 1, 2, 2, 2, 3, 3]
    assert data.image_file(2) == tmp_path.resolve() / "val2014" / "c.jpg"


def test_karpathy_flickr_has_no_filepath(tmp_path):
    doc = {"dataset": "flickr30k", "images": [
        {"filename": "1000.jpg", "split": "train", "sentences": _sent("a man", "a man running")},
        {"filename": "1001.jpg", "split": "test", "sentences": _sent("a woman")}]}
    ann = _write(tmp_path / "flickr.json", doc)
    data = read_dataset("flickr30k", tmp_path, ann)
    assert data.paths == ["1000.jpg", "1001.jpg"]
    assert data.splits == ["train", "test"]
    assert data.caption_image.tolist() == [0, 0, 1]
    # COCO entries need `filepath`: the same file is the wrong format for --dataset coco.
    with pytest.raises(DatasetError, match=r"images\[0\]: missing 'filepath'"):
        read_dataset("coco", tmp_path, ann)


def test_csv_and_jsonl_group_rows_by_image(tmp_path):
    (tmp_path / "pairs.csv").write_text("image_path,caption,split\n"
                                        "x.jpg,first caption,train\n"
                                        "y.jpg,other image,test\n"
                                        "x.jpg,second caption,train\n"
                                        "z.jpg,,val\n")
    data = read_dataset("csv", tmp_path, tmp_path / "pairs.csv")
    assert data.paths == ["x.jpg", "y.jpg", "z.jpg"]
    assert data.splits == ["train", "test", "val"]
    assert data.captions == ["first caption", "second caption", "other image", ""]  # empty kept: counted at encode
    assert data.caption_image.tolist() == [0, 0, 1, 2]

    lines = [{"image_path": "p.jpg", "caption": "one"}, {"image_path": "q.jpg", "caption": "two", "split": "restval"},
             {"image_path": "p.jpg", "caption": "three"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    data = read_dataset("csv", tmp_path, tmp_path / "pairs.jsonl")
    assert data.paths == ["p.jpg", "q.jpg"]
    assert data.splits == ["train", "train"]  # no split -> train; restval -> train
    assert data.captions == ["one", "three", "two"]


@pytest.mark.parametrize("kind,name,content,message", [
    ("coco", "dataset_coco.json", '{"images": [', r"dataset_coco.json: malformed JSON at line 1"),
    ("coco", "dataset_coco.json", '[1, 2]', r"not in the Karpathy format"),
    ("coco", "dataset_coco.json", "image_path,caption\nx.jpg,hi\n", r"malformed JSON"),
    ("flickr30k", "dataset_flickr30k.json", '{"images": [{"filename": "a.jpg", "split": "dev", "sentences": []}]}',
     r"images\[0\]: split 'dev' is not one of"),
    ("csv", "pairs.csv", "path,text\na.jpg,hi\n", r"pairs.csv: missing column\(s\) image_path, caption"),
    ("csv", "pairs.csv", "image_path,caption,split\na.jpg,hi,train\na.jpg,ho,test\n",
     r"line 3: image 'a.jpg' is in split 'test' here but 'train' earlier"),
    ("csv", "pairs.jsonl", '{"image_path": "a.jpg", "caption": "x"}\n{"image_path": \n', r"line 2: malformed JSON"),
])
def test_bad_annotation_files_give_one_line_error_and_exit_2(tmp_path, capsys, kind, name, content, message):
    ann = _write(tmp_path / name, content)
    with pytest.raises(DatasetError, match=message):
        read_dataset(kind, tmp_path, ann)
    argv = ["encode", "--dataset", kind, "--root", str(tmp_path), "--annotations", str(ann), "--model", "rcsr-tiny",
            "--out", str(tmp_path / "feats")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rcsr-ray: ") and str(ann) in err[0]
    assert re.search(message, err[0])
    assert not (tmp_path / "feats").exists()


def test_missing_inputs_are_named(tmp_path, capsys):
    with pytest.raises(DatasetError, match="dataset_coco.json: annotation file does not exist"):
        read_dataset("coco", tmp_path)
    with pytest.raises(DatasetError, match="image folder does not exist"):
        read_dataset("coco", tmp_path / "nope")
    with pytest.raises(DatasetError, match="--dataset csv needs --annotations"):
        read_dataset("csv", tmp_path)
    assert main(["encode", "--dataset", "flickr30k", "--root", str(tmp_path), "--model", "rcsr-tiny",
                 "--out", str(tmp_path / "f")]) == 2
    assert "dataset_flickr30k.json: annotation file does not exist" in capsys.readouterr().err


def test_shapes_dataset_is_deterministic_and_captions_describe_the_images(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", {"train": 10, "restval": 2, "val": 2, "test": 4}, seed=3)
    b = make_shapes_dataset(tmp_path / "b", {"train": 10, "restval": 2, "val": 2, "test": 4}, seed=3)
    c = make_shapes_dataset(tmp_path / "c", {"train": 10, "restval": 2, "val": 2, "test": 4}, seed=4)
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()
    for f in (tmp_path / "a" / "images").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / "images" / f.name).read_bytes()

    data = read_dataset("coco", tmp_path / "a")
    assert data.num_images == 18 and len(data.captions) == 18 * 3
    assert data.splits.count("train") == 12 and data.splits.count("test") == 4
    colour_re = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")
    position_re = re.compile(r"\b(" + "|".join(POSITIONS) + r")\b")
    for i in range(data.num_images):
        caps = [c for c, o in zip(data.captions, data.caption_image) if o == i]
        # The first shape is named first in every caption and drawn on top: its colour is at its position.
        colour = {colour_re.search(c).group(1) for c in caps}
        position = {position_re.search(c).group(1) for c in caps}
        assert len(colour) == 1 and len(position) == 1
        img = np.asarray(Image.open(data.image_file(i)).convert("RGB"), np.float64)
        x, y = (int(v * img.shape[0]) for v in POSITIONS[position.pop()])
        assert np.abs(img[y, x] - COLOURS[colour.pop()]).max() < 40  # JPEG error only
