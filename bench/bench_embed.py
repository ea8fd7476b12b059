"""Benchmark: the embed stage on WebDataset shards against a plain open_clip loop.

    python bench/bench_embed.py [--model ViT-B-32 --shards 8 --per-shard 100 --batch 32]

Both sides embed the same shards (256 px JPEGs, LAION-like captions of 2 to 40 words) with the
same model (random weights: nothing downloads) and batch size, in the same run, alternating,
best of `--repeats`:

- plain loop: one process builds the model, reads each tar with `tarfile`, decodes with PIL,
  preprocesses and encodes images and captions with open_clip, using every CPU thread torch
  wants (torch and open_clip are already imported: the stage's actor imports them itself);
- condense: the embed stage as the pipeline runs it: one actor (on a CPU machine, using every
  CPU's threads) reads, checks, decodes and encodes each shard and writes its embed/ part,
  then the id check runs. The stage's time includes starting the actor, its imports and
  loading the model in it.

It prints images/s for each and the ratio (target on CPU: condense >= 0.95x the plain loop),
then how far the device decode (torchvision, here on the CPU) is from Pillow's on the demo's
photos: the cosine between the two paths' image embeddings.
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = (  # noqa: SIM905 - one line of words reads better than a column of them
    "a photo of the red house by lake in winter light with two dogs on green grass near old "
    "stone bridge at sunset blue sky over city street people walking white car vintage poster "
    "for sale wooden table modern kitchen design wedding dress portrait young woman smiling"
).split()


def caption(rng) -> str:
    """A LAION-like caption: 2 to 40 words, 11 on average (LAION-2B's English captions)."""
    n = int(np.clip(rng.gamma(3.0, 11 / 3.0), 2, 40))
    return " ".join(rng.choice(WORDS, n))


def make_shards(folder: Path, shards: int, per_shard: int, seed: int = 0) -> None:
    """Shards of smooth random photos-like JPEGs (256 x 256) with LAION-like captions."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for s in range(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                image = Image.fromarray(small).resize((256, 256), Image.BICUBIC)
                jpg = io.BytesIO()
                image.save(jpg, format="JPEG", quality=90)
                for ext, data in (("jpg", jpg.getvalue()), ("txt", caption(rng).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (folder / f"{s:05d}.tar").write_bytes(buf.getvalue())


def plain_loop(folder: Path, model_name: str, batch: int) -> float:
    """Seconds for a straightforward single-process open_clip loop over the shards."""
    import open_clip
    import torch
    from PIL import Image

    start = time.perf_counter()  # like the stage's actor, the loop builds its model
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    for shard in sorted(folder.glob("*.tar")):
        images, captions = [], []
        with tarfile.open(shard) as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                if member.name.endswith(".jpg"):
                    images.append(preprocess(Image.open(io.BytesIO(data)).convert("RGB")))
                else:
                    captions.append(data.decode())
        with torch.inference_mode():
            for i in range(0, len(images), batch):
                model.encode_image(torch.stack(images[i : i + batch]))
                model.encode_text(tokenizer(captions[i : i + batch]))
    return time.perf_counter() - start


def condense_stage(folder: Path, run_dir: Path, model_name: str, batch: int) -> float:
    """Seconds for the embed stage on the same shards (Ray already initialised)."""
    from condense.config import config_from_dict
    from condense.pipeline.runner import compute_stage
    from condense.runtime.ray import RayExecutor
    from condense.stages.base import StageContext
    from condense.stages.embed import EmbedStage
    from condense.storage.rundir import RunDir

    config = config_from_dict(
        {
            "input": {"kind": "webdataset", "path": str(folder)},
            "embed": {"model": {"name": model_name, "batch_size": batch}},
            "ray": {"progress": False},
        },
        "bench",
    )
    run = RunDir(run_dir)
    run.clear_stage("embed")
    ctx = StageContext(run=run, config=config, executor=RayExecutor(), progress=False)
    start = time.perf_counter()
    compute_stage(ctx, EmbedStage(), "bench", resume=False)
    return time.perf_counter() - start


def caption_cost(model: str, batch: int, n: int = 512) -> tuple[float, float]:
    """Seconds to encode n LAION-like captions: open_clip's full 77-token context, and the
    stage's length-ordered batches cut to their longest caption."""
    import torch

    from condense.stages.embed.clip import ClipEncoder

    rng = np.random.default_rng(1)
    captions = [caption(rng) for _ in range(n)]
    encoder = ClipEncoder(model, batch_size=batch)
    tokens = encoder.tokenizer(captions)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, n, batch):
            encoder.model.encode_text(tokens[i : i + batch])
    full = time.perf_counter() - start
    start = time.perf_counter()
    encoder.encode_texts(captions)
    return full, time.perf_counter() - start


def decode_agreement(model: str) -> tuple[float, float]:
    """(min, mean) cosine between Pillow's and the device path's image embeddings of the demo's
    photos, as JPEGs at their own sizes."""
    import torch

    from condense.cores.images import decode_rgb
    from condense.demo.corpus import photos
    from condense.readers.shards import ShardLimits
    from condense.stages.embed.clip import ClipEncoder, image_transform, preprocess_config
    from condense.stages.embed.pixels import DevicePixels

    encoder = ClipEncoder(model)
    cfg = preprocess_config(model)
    transform = image_transform(cfg)
    data = []
    for _name, image in photos():
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        data.append(buf.getvalue())
    pil = torch.stack([transform(decode_rgb(d)[0]) for d in data])
    device, _keep, _dropped = DevicePixels(cfg, "cpu", transform, ShardLimits())(data)
    cos = (encoder.encode_images(pil) * encoder.encode_images(device)).sum(axis=1)
    return float(cos.min()), float(cos.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    images = args.shards * args.per_shard
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        folder = Path(tmp) / "shards"
        folder.mkdir()
        make_shards(folder, args.shards, args.per_shard)
        plain, ours = [], []
        for _ in range(args.repeats):  # alternate, so drift hits both sides alike
            plain.append(plain_loop(folder, args.model, args.batch))
            ours.append(condense_stage(folder, Path(tmp) / "run", args.model, args.batch))
    p, o = min(plain), min(ours)
    print(
        f"\n# {images} images ({args.shards} shards), {args.model}, batch {args.batch}, "
        f"{os.cpu_count()} CPUs, best of {args.repeats}"
    )
    print("| method | seconds (runs) | images/s |")
    print("|---|---:|---:|")
    print(
        f"| plain open_clip loop | {p:.1f} ({', '.join(f'{x:.1f}' for x in plain)}) | {images / p:.1f} |"
    )
    print(
        f"| condense embed stage | {o:.1f} ({', '.join(f'{x:.1f}' for x in ours)}) | {images / o:.1f} |"
    )
    print(f"\nratio condense / plain (images/s): {p / o:.2f}x (target >= 0.95x)")
    full, cut = caption_cost(args.model, args.batch)
    print(
        f"captions (512, LAION-like lengths): full context {full:.1f} s, length-ordered and "
        f"cut {cut:.1f} s ({full / cut:.1f}x)"
    )
    low, mean = decode_agreement(args.model)
    print(
        f"device decode (torchvision on the CPU) vs Pillow, {args.model} image embeddings of "
        f"the demo's photos: cosine min {low:.6f}, mean {mean:.6f}"
    )


if __name__ == "__main__":
    main()
