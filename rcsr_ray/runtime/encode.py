"""`rcsr-ray encode`: a real dataset -> a feature store, with a frozen open_clip model on Ray Data.

Work is cut into shards (a fixed run of images or captions). A shard is the unit of everything:
one CPU task decodes and preprocesses its images, one actor call encodes it as one batch, and the
driver saves its embeddings to the work folder next to the output (`<out>.encode-work/`) as soon as
it arrives. An interrupted encode therefore resumes with the missing shards only, and since a
shard is always encoded as the same batch by the same model, the final store is identical to that
of an uninterrupted run. The encoder actors hold the model once each, on a fractional GPU when the
cluster has GPUs, else on one CPU.

Nothing disappears silently: missing or corrupt images, empty captions, images left without any
caption, and the captions of skipped images are counted in `report.json` and printed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import ray
from tqdm.auto import tqdm

from rcsr_ray.config import ConfigError, load_config
from rcsr_ray.data.readers import ImageCaptions, read_dataset
from rcsr_ray.data.store import FeatureStore, write_store
from rcsr_ray.models.backbone import load_backbone
from rcsr_ray.runtime.connect import ensure_ray
from rcsr_ray.runtime.ray_backend import actor_device

log = logging.getLogger(__name__)

MAX_EXAMPLES = 10  # offending paths listed in the report
WORK_FORMAT = 1


@dataclass
class EncodeReport:
    encoded_images: int = 0
    encoded_captions: int = 0
    skipped_images: int = 0  # missing, corrupt, or left with no non-empty caption
    skipped_captions: int = 0  # empty captions
    dropped_captions: int = 0  # non-empty captions of skipped images
    examples: list[dict] = field(default_factory=list)  # first offending paths: {"path", "reason"}
    seconds_images: float = 0.0  # from the pipeline start to the last image shard of this run
    seconds_captions: float = 0.0  # ... to the last caption shard (resumed shards cost nothing)
    images_this_run: int = 0
    captions_this_run: int = 0
    resumed_shards: int = 0  # shards found in the work folder

    def add_example(self, path: str, reason: str) -> None:
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"path": path, "reason": reason})

    def throughput(self) -> str:
        ips = self.images_this_run / self.seconds_images if self.seconds_images else 0.0
        cps = self.captions_this_run / self.seconds_captions if self.seconds_captions else 0.0
        return (f"throughput: {ips:.1f} images/s ({self.images_this_run} in {self.seconds_images:.1f} s), "
                f"{cps:.1f} captions/s ({self.captions_this_run} in {self.seconds_captions:.1f} s)")

    def lines(self) -> list[str]:
        out = [f"encoded {self.encoded_images} images, {self.encoded_captions} captions; "
               f"skipped {self.skipped_images} images, {self.skipped_captions} empty captions, "
               f"dropped {self.dropped_captions} captions of skipped images"]
        out += [f"  {e['path']}: {e['reason']}" for e in self.examples]  # an image skipped, or one caption
        if self.resumed_shards:
            out.append(f"resumed: {self.resumed_shards} shards were already encoded")
        return out + [self.throughput()]


# ---------------------------------------------------------------------------------------------
# Ray Data stages (run in Ray workers)
# ---------------------------------------------------------------------------------------------
def _decode_shard(row: dict, root: str, preprocess, image_size: int) -> dict:
    """One image shard -> preprocessed pixels; a missing or corrupt image becomes zeros plus a reason.
    Caption shards pass through (with no pixels), so both kinds share one pipeline and actor pool."""
    from PIL import Image, UnidentifiedImageError

    items = [str(x) for x in row["items"]]
    if row["kind"] != "images":
        return {**row, "pixels": np.zeros((0, 3, image_size, image_size), np.float32),
                "ok": np.ones(len(items), bool), "reasons": "[]"}
    pixels = np.zeros((len(items), 3, image_size, image_size), np.float32)
    ok, reasons = np.zeros(len(items), bool), [""] * len(items)
    for i, rel in enumerate(items):
        try:
            with Image.open(os.path.join(root, rel)) as img:
                pixels[i] = preprocess(img.convert("RGB")).numpy()
            ok[i] = True
        except FileNotFoundError:
            reasons[i] = "missing file"
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
            reasons[i] = f"corrupt image: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}"
    return {**row, "pixels": pixels, "ok": ok, "reasons": json.dumps(reasons)}


class _Encoder:
    """An actor of the pool: loads the backbone once, then encodes one shard (images or captions) per call."""

    def __init__(self, model: str, pretrained: str | None, seed: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the driver already warned about random weights
            self.backbone = load_backbone(model, pretrained, device=actor_device(), seed=seed)

    def __call__(self, batch: dict) -> dict:
        ok = np.asarray(batch["ok"][0], bool)
        if batch["kind"][0] == "images":
            emb = np.zeros((len(ok), self.backbone.dim), np.float32)
            if ok.any():
                emb[ok] = self.backbone.encode_images(batch["pixels"][0][ok])
        else:
            emb = self.backbone.encode_texts([str(t) for t in batch["items"][0]])
        return {"kind": batch["kind"], "shard": batch["shard"], "emb": emb[None], "ok": ok[None],
                "reasons": batch["reasons"]}


# ---------------------------------------------------------------------------------------------
# the work folder
# ---------------------------------------------------------------------------------------------
def work_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.encode-work"


def _fingerprint(data: ImageCaptions, model: str, pretrained: str | None, seed: int, shard_size: int) -> str:
    h = hashlib.sha256()
    weights = pretrained
    if pretrained and os.path.isfile(pretrained):
        st = os.stat(pretrained)
        weights = f"{os.path.abspath(pretrained)}:{st.st_size}:{st.st_mtime_ns}"
    h.update(json.dumps([WORK_FORMAT, str(data.root), model, weights, seed, shard_size]).encode())
    h.update(json.dumps([data.paths, data.splits, data.captions]).encode())
    h.update(data.caption_image.tobytes())
    return h.hexdigest()


def _open_work(work: Path, fingerprint: str) -> None:
    """Reuse the work folder of an interrupted encode of the same inputs, else start a fresh one."""
    plan = work / "plan.json"
    if plan.is_file():
        try:
            same = json.loads(plan.read_text()).get("fingerprint") == fingerprint
        except json.JSONDecodeError:
            same = False
        if same:
            return
        log.warning("%s belongs to an encode of other inputs; starting over", work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    plan.write_text(json.dumps({"fingerprint": fingerprint}))


def _save(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # a shard file exists only once it is complete


def _shard_file(work: Path, kind: str, shard: int) -> Path:
    return work / f"{kind}-{shard:06d}.npz"


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def _actor_resources(actors: int | None, gpu_share: float) -> tuple[int, dict]:
    """Pool size and per-actor resources: `gpu_share` of a GPU each when the cluster has GPUs,
    else one CPU each on half the CPUs (the other half decodes images)."""
    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0.0), res.get("CPU", 1.0)
    if gpus:
        return actors or max(1, int(gpus / gpu_share)), {"num_gpus": gpu_share, "num_cpus": 1}
    return actors or max(1, int(cpus) // 2), {"num_cpus": 1}


def _run_pipeline(shards: list[dict], work: Path, model: str, pretrained: str | None, seed: int, actors: int,
                  resources: dict, preprocess, image_size: int, root: str, bar, on_shard,
                  report: EncodeReport) -> None:
    """Encode the shards through Ray Data, saving each as it arrives."""
    if not shards:
        return
    # One block per shard: shards are decoded in parallel CPU tasks. Half a CPU each, which also
    # keeps Ray Data from fusing decoding into the encoder actors (it fuses equal resources).
    ds = ray.data.from_items(shards, override_num_blocks=len(shards))
    ds = ds.map(_decode_shard, fn_kwargs={"root": root, "preprocess": preprocess, "image_size": image_size},
                num_cpus=0.5)
    ds = ds.map_batches(_Encoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                        fn_constructor_kwargs={"model": model, "pretrained": pretrained, "seed": seed}, **resources)
    start = time.perf_counter()
    for row in ds.iter_rows():
        kind, shard = str(row["kind"]), int(row["shard"])
        extra = {"ok": np.asarray(row["ok"], bool), "reasons": np.asarray(row["reasons"])} if kind == "images" else {}
        _save(_shard_file(work, kind, shard), emb=np.asarray(row["emb"], np.float32), **extra)
        n = len(row["emb"])
        # Rates run from the pipeline start (actor start-up included) to each kind's last shard.
        setattr(report, f"{kind}_this_run", getattr(report, f"{kind}_this_run") + n)
        setattr(report, f"seconds_{kind}", time.perf_counter() - start)
        bar.update(n)
        if on_shard is not None:
            on_shard(kind, shard)


def encode_dataset(data: ImageCaptions, out: str | Path, model: str, pretrained: str | None = None, *,
                   dataset: str = "", seed: int = 0, shard_size: int = 256, actors: int | None = None,
                   gpu_share: float = 0.5, progress: bool = True,
                   on_shard: Callable[[str, int], None] | None = None) -> tuple[FeatureStore, EncodeReport]:
    """Encode `data` into a feature store at `out` (resuming from `<out>.encode-work/` if present).

    Uses the running Ray instance, else joins or starts one (`ensure_ray`). `on_shard(kind, shard)`
    is called after each shard is saved.
    """
    out = Path(out).resolve()
    if shard_size < 1:
        raise ConfigError("--shard-size", shard_size, "an integer >= 1")
    if actors is not None and actors < 1:
        raise ConfigError("--actors", actors, "an integer >= 1")
    if not 0 < gpu_share <= 1:
        raise ConfigError("--gpu-share", gpu_share, "a GPU fraction in (0, 1]")
    if out.exists() and not (out / "meta.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        # The store replaces the folder: never delete something that is not a store.
        raise ConfigError("--out", str(out), "a new folder or an existing feature store (this is neither)")
    backbone = load_backbone(model, pretrained, seed=seed)  # fails here, before any work, on a bad name/tag
    # The actors hold the model; the driver keeps only what preprocessing and the store need.
    preprocess, image_size, dim = backbone.preprocess, backbone.image_size, backbone.dim
    del backbone
    ensure_ray(load_config())  # runtime.address / RAY_ADDRESS, else a local instance on 127.0.0.1
    work = work_dir(out)
    _open_work(work, _fingerprint(data, model, pretrained, seed, shard_size))

    report = EncodeReport()
    texts = [c.strip() for c in data.captions]
    text_rows = np.flatnonzero([bool(t) for t in texts])  # empty captions are skipped, not encoded
    image_shards = [{"kind": "images", "shard": s, "items": data.paths[a:a + shard_size]}
                    for s, a in enumerate(range(0, data.num_images, shard_size))]
    text_shards = [{"kind": "captions", "shard": s, "items": [texts[i] for i in text_rows[a:a + shard_size]]}
                   for s, a in enumerate(range(0, len(text_rows), shard_size))]
    todo = [sh for sh in image_shards + text_shards if not _shard_file(work, sh["kind"], sh["shard"]).is_file()]
    report.resumed_shards = len(image_shards) + len(text_shards) - len(todo)

    n_actors, resources = _actor_resources(actors, gpu_share)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar, ours
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    with tqdm(total=sum(len(sh["items"]) for sh in todo), unit="item", desc="encode", disable=not progress,
              file=sys.stderr) as bar:
        _run_pipeline(todo, work, model, pretrained, seed, n_actors, resources, preprocess,
                      image_size, str(data.root), bar, on_shard, report)

    store = _assemble(data, texts, text_rows, image_shards, text_shards, work, out, report, dim,
                      meta={"source": "encode", "dataset": dataset, "annotations": str(data.annotations),
                            "root": str(data.root), "model": model, "seed": seed,
                            "pretrained": os.path.abspath(pretrained) if pretrained and os.path.isfile(pretrained)
                            else pretrained})
    shutil.rmtree(work)
    return store, report


def _assemble(data, texts, text_rows, image_shards, text_shards, work, out, report, dim, meta) -> FeatureStore:
    """Shards -> the feature store (skipping what could not be encoded) and its report.json."""
    img = [np.load(_shard_file(work, "images", sh["shard"])) for sh in image_shards]
    image_emb = np.concatenate([f["emb"] for f in img]) if img else np.zeros((0, dim), np.float32)
    ok = np.concatenate([f["ok"] for f in img]) if img else np.zeros(0, bool)
    reasons = [r for f in img for r in json.loads(str(f["reasons"]))]
    cap = [np.load(_shard_file(work, "captions", sh["shard"]))["emb"] for sh in text_shards]
    caption_emb = np.concatenate(cap) if cap else np.zeros((0, dim), np.float32)

    has_text = np.zeros(data.num_images, bool)
    has_text[data.caption_image[text_rows]] = True
    keep = ok & has_text
    for i in np.flatnonzero(~keep):
        report.add_example(data.paths[i], reasons[i] if not ok[i] else "no non-empty caption")
    empty = np.setdiff1d(np.arange(len(texts)), text_rows)
    first = np.searchsorted(data.caption_image, np.arange(data.num_images))  # first caption of each image
    for j in empty:
        i = data.caption_image[j]
        report.add_example(data.paths[i], f"caption {j - first[i] + 1} of this image is empty")
    kept_caption = keep[data.caption_image[text_rows]]
    new_row = np.cumsum(keep) - 1  # image index -> row in the store
    report.encoded_images = int(keep.sum())
    report.encoded_captions = int(kept_caption.sum())
    report.skipped_images = int((~keep).sum())
    report.skipped_captions = int(len(empty))
    report.dropped_captions = int((~kept_caption).sum())
    keep_rows = np.flatnonzero(keep)
    store = write_store(out, image_emb[keep], caption_emb[kept_caption],
                        new_row[data.caption_image[text_rows[kept_caption]]],
                        split=np.asarray(data.splits, object)[keep],
                        image_paths=[data.paths[i] for i in keep_rows],
                        caption_texts=[texts[i] for i in text_rows[kept_caption]], meta=meta)
    payload = {k: getattr(report, k) for k in ("encoded_images", "encoded_captions", "skipped_images",
                                               "skipped_captions", "dropped_captions", "examples")}
    (out / "report.json").write_text(json.dumps(payload, indent=2))
    return store


def encode_command(dataset: str, root: str, out: str, model: str, annotations: str | None = None,
                   pretrained: str | None = None, seed: int = 0, shard_size: int = 256, actors: int | None = None,
                   gpu_share: float = 0.5, progress: bool = True) -> int:
    """`rcsr-ray encode`: validate the dataset, join or start Ray, encode, print the report."""
    data = read_dataset(dataset, root, annotations)  # a bad annotation file fails here, before Ray starts
    print(f"rcsr-ray encode: {dataset} {data.annotations}: {data.num_images} images, {len(data.captions)} captions; "
          f"model {model} ({pretrained or 'random weights'}) -> {out}", file=sys.stderr)
    store, report = encode_dataset(data, out, model, pretrained, dataset=dataset, seed=seed, shard_size=shard_size,
                                   actors=actors, gpu_share=gpu_share, progress=progress)
    print("\n".join(report.lines()))
    print(f"feature store: {store.path} (dim {store.dim}); report: {store.path / 'report.json'}")
    print(f"train on it: rcsr-ray run data.source=features data.path={store.path}")
    return 0
