"""The embedded benchmark: determinism, shapes, norms, and the zero-shot / centralized gap."""
import numpy as np

from rcsr_ray.config import SyntheticConfig
from rcsr_ray.data.store import FeatureStore
from rcsr_ray.data.synthetic import client_shift_vectors, ensure_store, generate
from rcsr_ray.runtime.loop import run_simulation


def test_deterministic_shapes_norms():
    cfg = SyntheticConfig(train_images=300, test_images=50, dim=64, concepts=6, attributes=8, instance_dim=8)
    a, b = generate(cfg), generate(cfg)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["image_emb"].shape == (350, 64) and a["caption_emb"].shape == (350 * 5, 64)
    assert a["image_emb"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a["image_emb"], axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(a["caption_emb"], axis=1), 1, atol=1e-5)
    assert np.bincount(a["caption_image"]).tolist() == [5] * 350
    assert (a["split"] == "test").sum() == 50 and set(np.unique(a["cluster"])) <= set(range(6))
    c = generate(SyntheticConfig(**{**cfg.__dict__, "seed": 1}))
    assert not np.array_equal(a["image_emb"], c["image_emb"])


def test_store_roundtrip_and_cache(tmp_path):
    cfg = SyntheticConfig(train_images=200, test_images=40, dim=32, concepts=5, attributes=6, instance_dim=8)
    store = ensure_store(cfg, tmp_path)
    again = ensure_store(cfg, tmp_path)
    assert store.path == again.path
    reopened = FeatureStore(store.path)
    arrays = generate(cfg)
    np.testing.assert_array_equal(np.asarray(reopened.image_emb), arrays["image_emb"])
    test = reopened.split("test")
    assert len(test.image_rows) == 40 and len(test.caption_rows) == 200
    np.testing.assert_array_equal(test.caption_image, np.repeat(np.arange(40), 5))


def test_client_shift_is_per_client_and_sized():
    a_img, a_txt = client_shift_vectors(0, 3, 64, 0.4)
    b_img, _ = client_shift_vectors(0, 4, 64, 0.4)
    assert np.linalg.norm(a_img) == np.float32(np.linalg.norm(a_img)) and abs(np.linalg.norm(a_img) - 0.4) < 1e-5
    assert not np.allclose(a_img, b_img) and not np.allclose(a_img, a_txt)


def test_zeroshot_imperfect_and_centralized_gain(small_config):
    # Defaults of the benchmark at reduced size: zero-shot is imperfect, pooled training gains a lot.
    cfg = small_config(**{"data.synthetic.train_images": 2000, "data.synthetic.test_images": 300,
                          "data.synthetic.dim": 128, "data.synthetic.concepts": 20,
                          "data.synthetic.attributes": 16, "data.synthetic.instance_dim": 32,
                          "model.adapter.bottleneck": 32, "fed.method": "central", "fed.rounds": 4,
                          "train.local_epochs": 2, "train.batch_size": 64, "eval.every": 4})
    result = run_simulation(cfg, progress=False)
    zs = result.summary["zeroshot"]["mean_r1"]
    assert 10 < zs < 60, zs
    assert result.summary["mean_r1"] - zs > 20, (zs, result.summary["mean_r1"])


def test_federation_regenerates_a_missing_synthetic_store(small_config, tmp_path):
    """A cluster node without the generated store (no shared cache) gets the same bytes back."""
    import pickle
    import shutil

    import numpy as np

    from rcsr_ray.data.federation import build_federation

    cfg = small_config(**{"data.cache_dir": str(tmp_path)})
    fed = build_federation(cfg)
    before = np.array(fed.shard(2).caption_emb)
    remote = pickle.loads(pickle.dumps(fed))  # what an actor on another node receives
    shutil.rmtree(fed.store_path)
    assert np.array_equal(remote.shard(2).caption_emb, before)


def test_text_only_shards_hold_no_images_and_the_pooled_shard_all(small_config):
    """A text-only client's shard has its images' count and captions, not the images (which in
    blocks mode would mean decoding them for nothing); the pooled shard of the centralized baseline
    holds every client's images, text-only clients' included."""
    from rcsr_ray.data.federation import build_federation
    from rcsr_ray.data.partition import PAIRED, TEXT_ONLY

    cfg = small_config(**{"partition.num_clients": 6, "partition.missing_rate": 0.5, "partition.image_only_share": 0.0,
                          "data.synthetic.client_shift": 0.3})
    fed = build_federation(cfg)
    text_only = np.flatnonzero(fed.partition.modality == TEXT_ONLY)
    assert len(text_only) == 3
    store, train = fed.store, fed.train
    for c in text_only:
        shard, local = fed.shard(int(c)), fed.partition.client_indices[c]
        assert shard.image_emb.shape == (len(local), 0) and shard.num_images == len(local) > 0
        assert len(shard.caption_emb) == shard.caption_offsets[-1] > 0 and shard.caption_emb.shape[1] == store.dim
    pooled = fed.pooled_shard()
    assert pooled.image_emb.shape == (len(train.image_rows), store.dim)
    # Client order, each with its own domain shift: the text-only clients' images are there, shifted.
    c = int(text_only[0])
    start = sum(len(fed.partition.client_indices[i]) for i in range(c))
    rows = pooled.image_emb[start:start + len(fed.partition.client_indices[c])]
    raw = np.asarray(store.image_emb[train.image_rows[fed.partition.client_indices[c]]])
    assert np.all(np.abs(np.linalg.norm(rows, axis=1) - 1) < 1e-5) and not np.allclose(rows, raw)
    assert np.allclose(rows, fed._shard(c, fed.partition.client_indices[c], PAIRED, train).image_emb)
