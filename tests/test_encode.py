"""The open_clip backbone loader and `rcsr-ray encode` (Ray Data), end to end on a shapes dataset."""
from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image

from rcsr_ray.cli import main
from rcsr_ray.config import ConfigError
from rcsr_ray.data.readers import read_dataset
from rcsr_ray.data.store import FeatureStore
from rcsr_ray.models.backbone import load_backbone
from rcsr_ray.runtime.encode import encode_dataset, work_dir
from tests.encode_util import make_broken_dataset

SHARD = 8  # 48 images and 95 non-empty captions -> 6 + 12 shards


def _quiet_load(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone(*args, **kwargs)


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# --- backbone ------------------------------------------------------------------------------------
def test_tiny_backbone_is_frozen_and_seeded():
    with pytest.warns(UserWarning, match="random weights"):
        bb = load_backbone("rcsr-tiny")
    assert not bb.model.training and not any(p.requires_grad for p in bb.model.parameters())
    assert bb.dim == 32 and bb.image_size == 32
    pixels = torch.stack([bb.preprocess(Image.new("RGB", (40, 30), c)) for c in ("red", "blue")])
    img = bb.encode_images(pixels)
    txt = bb.encode_texts(["a red square", "a blue circle", ""])
    assert img.shape == (2, 32) and txt.shape == (3, 32) and img.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    assert not np.allclose(img[0], img[1])
    same, other = _quiet_load("rcsr-tiny", seed=0), _quiet_load("rcsr-tiny", seed=1)
    assert torch.equal(_params(bb.model), _params(same.model))  # every process gets the same random model
    assert not torch.equal(_params(bb.model), _params(other.model))


def test_backbone_from_local_checkpoint(tmp_path):
    src = _quiet_load("rcsr-tiny", seed=5)
    ckpt = tmp_path / "tiny.pt"
    torch.save(src.model.state_dict(), ckpt)
    bb = load_backbone("rcsr-tiny", str(ckpt), seed=0)  # weights from the file, not from the seed
    assert torch.equal(_params(bb.model), _params(src.model))
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="a checkpoint for rcsr-tiny"):
        load_backbone("rcsr-tiny", str(bad))


def test_backbone_errors_name_the_fix(monkeypatch):
    with pytest.raises(ConfigError, match="model='no-such-net': an open_clip model name"):
        load_backbone("no-such-net")
    with pytest.raises(ConfigError, match="pretrained='nope': a local checkpoint file or a pretrained tag"):
        load_backbone("rcsr-tiny", "nope")

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(ConfigError) as err:
        load_backbone("ViT-B-32", "laion2b_s34b_b79k")
    msg = str(err.value)
    assert "could not be fetched (Name or service not known)" in msg and "pass its local file path" in msg
    assert "\n" not in msg


def test_encode_cli_bad_model_exits_2(tmp_path, capsys):
    make_broken_dataset(tmp_path / "data")
    argv = ["encode", "--dataset", "coco", "--root", str(tmp_path / "data"), "--out", str(tmp_path / "f")]
    assert main(argv + ["--model", "no-such-net"]) == 2
    assert main(argv + ["--model", "rcsr-tiny", "--shard-size", "0"]) == 2
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    assert main(argv[:-1] + [str(tmp_path / "precious"), "--model", "rcsr-tiny"]) == 2
    err = capsys.readouterr().err
    assert "rcsr-ray: config error: model='no-such-net'" in err and "--shard-size=0" in err
    assert "an existing feature store (this is neither)" in err
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "f").exists()


# --- encode --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoded(tmp_path_factory, ray_session):
    """One encode through the CLI of a dataset with a corrupt JPEG, a missing file and an empty caption."""
    base = tmp_path_factory.mktemp("encode")
    expected = make_broken_dataset(base / "data")
    out = base / "features"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["encode", "--dataset", "coco", "--root", str(base / "data"), "--model", "rcsr-tiny",
                   "--out", str(out), "--shard-size", str(SHARD), "--quiet"])
    return {"rc": rc, "base": base, "out": out, "expected": expected, "stdout": stdout.getvalue()}


def test_encode_skips_and_counts_bad_inputs(encoded):
    exp, out = encoded["expected"], encoded["out"]
    assert encoded["rc"] == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("encoded_images", "encoded_captions", "skipped_images", "skipped_captions", "dropped_captions"):
        assert report[key] == exp[key], key
    reasons = {e["path"]: e["reason"] for e in report["examples"]}
    assert set(reasons) == exp["skipped_paths"] | {exp["empty_caption_path"]}
    assert sorted(r.split(":")[0] for p, r in reasons.items() if p in exp["skipped_paths"]) == \
        ["corrupt image", "missing file"]
    assert "empty" in reasons[exp["empty_caption_path"]]
    assert f"encoded {exp['encoded_images']} images, {exp['encoded_captions']} captions" in encoded["stdout"]
    assert "images/s" in encoded["stdout"] and "captions/s" in encoded["stdout"]

    store = FeatureStore(out)
    assert len(store.images) == exp["encoded_images"] and len(store.captions) == exp["encoded_captions"]
    assert not set(store.images["path"]) & exp["skipped_paths"]
    assert (store.captions["text"].str.strip() != "").all()
    assert store.meta["root"] == str((encoded["base"] / "data").resolve())
    assert store.meta["model"] == "rcsr-tiny" and store.meta["pretrained"] is None
    assert sorted(set(store.images["split"])) == ["test", "train", "val"]  # restval folded into train
    assert not store.has_clusters  # the partitioner runs k-means
    assert not work_dir(out).exists()


def test_encoded_rows_match_an_in_process_encode(encoded):
    """Row alignment: each stored embedding is its own image's / caption's (the full-backbone mode
    re-reads raw data through `path` + meta root and `text`)."""
    store = FeatureStore(encoded["out"])
    bb = _quiet_load("rcsr-tiny", seed=0)
    root = store.meta["root"]
    rows = [0, 5, len(store.images) - 1]
    pixels = torch.stack([bb.preprocess(Image.open(f"{root}/{store.images['path'][r]}").convert("RGB"))
                          for r in rows])
    np.testing.assert_allclose(store.image_emb[rows], bb.encode_images(pixels), atol=1e-5)
    caps = [0, 17, len(store.captions) - 1]
    np.testing.assert_allclose(store.caption_emb[caps], bb.encode_texts(list(store.captions["text"][caps])),
                               atol=1e-5)
    # The caption rows point at the right images: the reader's captions of that path.
    data = read_dataset("coco", root)
    by_path = {p: {c.strip() for c, o in zip(data.captions, data.caption_image) if data.paths[o] == p}
               for p in data.paths}
    for text, image in zip(store.captions["text"], store.captions["image"]):
        assert text in by_path[store.images["path"][image]]


class Interrupt(Exception):
    pass


def test_interrupted_encode_resumes_to_the_same_store(encoded):
    base = encoded["base"]
    data = read_dataset("coco", base / "data")
    out = base / "resumed"
    seen = []

    def stop_after_two(kind, shard):
        seen.append((kind, shard))
        if len(seen) == 2:
            raise Interrupt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Interrupt):
            encode_dataset(data, out, "rcsr-tiny", shard_size=SHARD, progress=False, on_shard=stop_after_two)
        assert not out.exists()
        saved = sorted(work_dir(out).glob("*-*.npz"))
        assert len(saved) == 2
        saved_items = sum(len(np.load(f)["emb"]) for f in saved)
        store, report = encode_dataset(data, out, "rcsr-tiny", shard_size=SHARD, progress=False)

    assert report.resumed_shards == 2
    total = encoded["expected"]["images"] + encoded["expected"]["captions"] - 1  # empty caption never encoded
    assert report.images_this_run + report.captions_this_run == total - saved_items
    ref = FeatureStore(encoded["out"])
    assert np.array_equal(store.image_emb, ref.image_emb) and np.array_equal(store.caption_emb, ref.caption_emb)
    pd.testing.assert_frame_equal(store.images, ref.images)
    pd.testing.assert_frame_equal(store.captions, ref.captions)
    assert json.loads((out / "report.json").read_text()) == json.loads((encoded["out"] / "report.json").read_text())
    assert not work_dir(out).exists()


def test_encoded_store_feeds_a_federated_run(encoded, tmp_path):
    run_dir = tmp_path / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["run", "--quiet", "--out", str(run_dir), "data.source=features", f"data.path={encoded['out']}",
                   "runtime.backend=local", "partition.num_clients=3", "partition.clusters=4",
                   "partition.min_samples=6", "fed.rounds=2", "train.batch_size=8", "model.adapter.bottleneck=8",
                   "eval.every=1", "eval.local_test_images=8", "fed.method=fedavg"])
    assert rc == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2
    for key in ("i2t_r1", "i2t_r10", "t2i_r1", "t2i_r10", "rsum"):
        assert 0 <= summary[key] <= 100 * (6 if key == "rsum" else 1)
    assert summary["t2i_r10"] > 0 and summary["i2t_r10"] > 0  # 12 test images: R@10 cannot be empty
    assert len(pd.read_csv(run_dir / "metrics.csv")) == 3  # zero-shot row + 2 rounds


def test_work_folder_is_kept_only_for_the_same_inputs(tmp_path):
    from rcsr_ray.runtime.encode import _open_work

    work = tmp_path / "f.encode-work"
    _open_work(work, "abc")
    (work / "images-000000.npz").write_bytes(b"x")
    _open_work(work, "abc")  # same inputs: an interrupted encode continues
    assert (work / "images-000000.npz").exists()
    _open_work(work, "other")  # other dataset, model or shard size: start over
    assert not (work / "images-000000.npz").exists()
    assert json.loads((work / "plan.json").read_text()) == {"fingerprint": "other"}


@pytest.mark.parametrize("cluster,asked,expected", [
    ({"CPU": 16.0, "GPU": 2.0}, None, (4, {"num_gpus": 0.5, "num_cpus": 1})),  # two actors per GPU
    ({"CPU": 16.0, "GPU": 2.0}, 3, (3, {"num_gpus": 0.5, "num_cpus": 1})),
    ({"CPU": 8.0}, None, (4, {"num_cpus": 1})),  # no GPU: half the CPUs encode, half decode
    ({"CPU": 1.0}, None, (1, {"num_cpus": 1})),
])
def test_actor_pool_follows_the_cluster(monkeypatch, cluster, asked, expected):
    import ray

    from rcsr_ray.runtime.encode import _actor_resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: cluster)
    assert _actor_resources(asked, 0.5) == expected
