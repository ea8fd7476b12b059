"""One prepared device check: condense's GPU paths, measured in a single call, without Ray.

    python bench/device_check.py                      # on a GPU machine (about 5 minutes on an H200)
    python bench/device_check.py --tiny --device cpu  # the script itself, in seconds (make test)

Needs torch, torchvision, open_clip, transformers and peft, and what condense's modules import:
numpy, pyarrow, pydantic, PyYAML, tqdm, cloudpickle (no Ray, no faiss: the GPU assignment and
k-means run on torch alone). A machine without some of them gets them as wheels carried with
the working tree: open_clip_torch with ftfy, wcwidth and regex (timm is not needed), pydantic
with pydantic-core (a binary wheel for the machine's Python), annotated-types and
typing-inspection. condense itself is this repository (the script puts it on sys.path).

It measures, and writes as one JSON (--out) and one table:

1. **encoder**: ViT-L/14 image encoding at 224 px in bf16: images/s, TFLOP/s, MFU (FLOPs
   counted by torch's FlopCounterMode, against the GPU's dense bf16 peak).
2. **embed path**: a few hundred real JPEGs (--photos, else the photos shipped with
   scikit-image, else generated ones) through the embed actor's own code: decoded on the GPU
   (torchvision's `decode_jpeg`, nvJPEG), resized, cropped and normalised there, encoded:
   images/s, the fraction of the encoder alone, and the cosine to the Pillow path's embeddings.
3. **dedup**: `cores.components` on one cluster of each kind (typical, singletons, duplicate) of
   20,000 and 50,000 rows x 768, screened in fp32 and in bf16: seconds, the similarity work's
   TFLOP/s and its fraction of the fp32 and bf16 peaks, pairs rechecked, and whether the
   components equal the fp32 CPU result.
4. **k-means assignment**: 1M rows x 768 to 100,000 centroids screened in fp32, fp16 and bf16:
   rows/s, and whether every screen gives the same assignment, also as the CPU path's.
5. **training**: one Bunny step of the SigLIP-so400m + 1.5B LLM configuration, stage 1 and 2:
   tokens/s and MFU (bench/gpu_train.py's step).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from gpu_embed import PEAK_TFLOPS, flops_per_image, load, throughput  # noqa: E402

# Dense fp32 peaks (non-tensor-core), TFLOP/s; the bf16 ones are gpu_embed.PEAK_TFLOPS.
PEAK_FP32 = {"H100 80GB HBM3": 67.0, "H100 PCIe": 51.0, "H200": 67.0, "A100": 19.5}
TINY_CLIP = str(HERE.parent / "configs" / "models" / "tiny-clip.json")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peaks(device: str, bf16: float | None, fp32: float | None) -> tuple[float | None, float | None]:
    if not device.startswith("cuda"):
        return bf16, fp32
    name = torch.cuda.get_device_name()
    found = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    found32 = next((v for k, v in PEAK_FP32.items() if k in name), None)
    return bf16 or found, fp32 or found32


def check_encoder(args, peak: float | None) -> dict:
    model = TINY_CLIP if args.tiny else "ViT-L-14"
    precision = "bf16" if args.device.startswith("cuda") else "fp32"
    net, size = load(model, args.device)
    flops = flops_per_image(net, size, args.device)
    batch, steps = (8, 2) if args.tiny else (256, 20)
    rate = throughput(net, size, args.device, precision, batch, steps)
    tflops = rate * flops / 1e12
    return {
        "model": Path(model).stem,
        "image_size": size,
        "precision": precision,
        "gflop_per_image": round(flops / 1e9, 4),
        "images_per_s": round(rate, 1),
        "tflops": round(tflops, 2),
        "mfu": round(tflops / peak, 4) if peak else None,
    }


def photos(args) -> list[bytes]:
    """JPEG bytes of real photos (--photos, else scikit-image's), re-encoded at 256-512 px and
    repeated to the count asked for; generated pictures where neither is at hand."""
    from PIL import Image

    images = []
    if args.photos:
        images = [Image.open(p).convert("RGB") for p in sorted(Path(args.photos).glob("*.jp*g"))]
    if not images:
        try:
            import skimage.data as data

            names = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry")
            images = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in names]
        except ImportError:
            rng = np.random.default_rng(0)
            images = [
                Image.fromarray(rng.integers(0, 255, (384, 512, 3), dtype=np.uint8))
                for _ in range(6)
            ]
    out = []
    count = 16 if args.tiny else 512
    for i in range(count):
        image = images[i % len(images)]
        side = 256 + 32 * (i % 9)
        buf = io.BytesIO()
        image.resize((side, side * image.height // image.width)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def check_embed_path(args, encoder: dict) -> dict:
    """The embed actor's own path per batch (`stages/embed/pixels.py`, `clip.py`): JPEGs
    decoded on the device (nvJPEG, batched), resized, cropped and normalised there, then
    encoded; images/s, the fraction of the encoder alone, and the cosine between these image
    embeddings and those of the Pillow path on the CPU."""
    from condense.cores.images import decode_rgb
    from condense.readers.shards import ShardLimits
    from condense.stages.embed.clip import ClipEncoder, image_transform, preprocess_config
    from condense.stages.embed.pixels import DevicePixels

    model = TINY_CLIP if args.tiny else "ViT-L-14"
    cuda = args.device.startswith("cuda")
    batch_size = 8 if args.tiny else 128
    clip = ClipEncoder(
        model, device=args.device, precision="bf16" if cuda else "fp32", batch_size=batch_size
    )
    cfg = preprocess_config(model)
    transform = image_transform(cfg)
    device_pixels = DevicePixels(cfg, args.device, transform, ShardLimits())
    data = photos(args)

    def run() -> np.ndarray:
        out = []
        for i in range(0, len(data), batch_size):
            pixels, _keep, _dropped = device_pixels(data[i : i + batch_size])
            out.append(clip.encode_images(pixels))
        return np.concatenate(out)

    run()  # warm-up (decoder and kernels)
    synchronize(args.device)
    start = time.perf_counter()
    got = run()
    synchronize(args.device)
    rate = len(data) / (time.perf_counter() - start)
    pil = np.concatenate(
        [
            clip.encode_images(torch.stack([transform(decode_rgb(d)[0]) for d in data[i : i + 32]]))
            for i in range(0, min(len(data), 128), 32)
        ]
    )
    cos = (got[: len(pil)] * pil).sum(axis=1)
    return {
        "images": len(data),
        "decode": "nvJPEG (torchvision decode_jpeg)" if cuda else "torchvision on the CPU",
        "images_per_s": round(rate, 1),
        "fraction_of_encoder": round(rate / encoder["images_per_s"], 3),
        "cosine_vs_pillow_min": round(float(cos.min()), 6),
        "cosine_vs_pillow_mean": round(float(cos.mean()), 6),
    }


def cluster(kind: str, n: int, dim: int, seed: int = 0) -> np.ndarray:
    """One cluster of unit rows: typical (duplicate groups among spread rows), singletons (no
    pair near 0.86) or duplicate (one group of near-identical rows)."""
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal(dim).astype(np.float32)
    centre /= np.linalg.norm(centre)
    if kind == "duplicate":
        x = centre + 0.02 * rng.standard_normal((n, dim), dtype=np.float32)
    elif kind == "singletons":
        x = centre + 1.2 * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
    else:
        groups = centre + 1.2 * rng.standard_normal((n // 4, dim), dtype=np.float32) / np.sqrt(dim)
        x = groups[rng.integers(0, len(groups), n)]
        x = x + 0.12 * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def check_dedup(args, peak_bf16: float | None, peak_fp32: float | None) -> list[dict]:
    from condense.cores.components import components

    sizes, dim = ((300, 600), 32) if args.tiny else ((20_000, 50_000), 768)
    out = []
    for n in sizes:
        for kind in ("typical", "singletons", "duplicate"):
            x = cluster(kind, n, dim)
            reference = components(x, [0.86], device="cpu")  # fp32 on the CPU
            for precision in ("fp32", "bf16"):
                components(x[:256], [0.86], device=args.device, precision=precision)  # warm-up
                synchronize(args.device)
                start = time.perf_counter()
                got = components(x, [0.86], device=args.device, precision=precision)
                synchronize(args.device)
                seconds = time.perf_counter() - start
                tflops = 2 * dim * got.entries_computed / seconds / 1e12
                out.append(
                    {
                        "rows": n,
                        "kind": kind,
                        "precision": precision,
                        "seconds": round(seconds, 3),
                        "tflops": round(tflops, 3),
                        "of_bf16_peak": round(tflops / peak_bf16, 4) if peak_bf16 else None,
                        "of_fp32_peak": round(tflops / peak_fp32, 4) if peak_fp32 else None,
                        "tiles_computed": got.tiles_computed,
                        "pairs_rechecked": got.rechecked,
                        "same_as_fp32_cpu": bool(np.array_equal(got.labels, reference.labels)),
                    }
                )
    return out


def check_assign(args) -> dict:
    """1M rows to 100,000 centroids at each screen precision: rows/s, and the assignment the
    same at every precision and, on the first 4,096 rows, the same as the CPU path's."""
    from condense.cores.kmeans import assign, prepare_centroids

    rows, k, dim = (2000, 100, 32) if args.tiny else (1_000_000, 100_000, 768)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    centroids = prepare_centroids(rng.standard_normal((k, dim), dtype=np.float32) / np.sqrt(dim))
    device = args.device if args.device.startswith("cuda") else "torch-cpu"
    out: dict = {"rows": rows, "k": k, "dim": dim}
    ids = {}
    for screen in ("fp32", "fp16", "bf16"):
        assign(x[:4096], centroids, device=device, screen=screen)  # warm-up: centroids copied
        synchronize(args.device)
        start = time.perf_counter()
        ids[screen] = assign(x, centroids, device=device, screen=screen).cluster_id
        synchronize(args.device)
        seconds = time.perf_counter() - start
        out[screen] = {
            "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds, 1),
            "tflops": round(2 * rows * k * dim / seconds / 1e12, 2),
        }
    cpu = assign(x[:4096], centroids, device="cpu").cluster_id
    out["same_at_every_screen"] = all(np.array_equal(v, ids["fp32"]) for v in ids.values())
    out["same_as_cpu"] = bool(np.array_equal(ids["fp16"][:4096], cpu))
    out["clusters_used"] = int(len(np.unique(ids["fp16"])))
    return out


def check_training(args, peak: float | None) -> list[dict]:
    from gpu_train import bench_stage

    train_args = argparse.Namespace(
        tiny=args.tiny,
        llm="1.5b",
        batch=2 if args.tiny else 8,
        text=16 if args.tiny else 512,
        steps=1 if args.tiny else 3,
        lora_r=8 if args.tiny else 128,
        gradient_checkpointing=False,
    )
    out = []
    for stage in ("stage1", "stage2"):
        out.append(bench_stage(stage, train_args, torch.device(args.device), peak))
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def table(result: dict) -> str:
    e, p, a = result["encoder"], result["embed_path"], result["assign"]
    lines = [
        f"# device check on {result['device']}",
        "| check | figure |",
        "|---|---|",
        f"| encoder {e['model']} {e['image_size']} px {e['precision']} | {e['images_per_s']:,} "
        f"images/s, {e['tflops']} TFLOP/s, MFU {e['mfu']} |",
        f"| embed path ({p['decode']}, {p['images']} JPEGs) | {p['images_per_s']:,} images/s, "
        f"{p['fraction_of_encoder']:.0%} of the encoder; cosine to Pillow's min "
        f"{p['cosine_vs_pillow_min']}, mean {p['cosine_vs_pillow_mean']} |",
    ]
    for d in result["dedup"]:
        lines.append(
            f"| dedup {d['kind']} {d['rows']:,} rows {d['precision']} | {d['seconds']} s, "
            f"{d['tflops']} TFLOP/s (bf16 peak {d['of_bf16_peak']}, fp32 peak "
            f"{d['of_fp32_peak']}), {d['pairs_rechecked']:,} rechecked, same as fp32 CPU: "
            f"{d['same_as_fp32_cpu']} |"
        )
    for screen in ("fp32", "fp16", "bf16"):
        lines.append(
            f"| assign {a['rows']:,} rows to {a['k']:,} centroids, {screen} screen | "
            f"{a[screen]['rows_per_s']:,} rows/s ({a[screen]['tflops']} TFLOP/s) |"
        )
    lines.append(
        f"| assign: same at every screen / same as the CPU | {a['same_at_every_screen']} / "
        f"{a['same_as_cpu']} |"
    )
    for t in result["training"]:
        lines.append(
            f"| train {t['stage']} ({t['vision_params_m']}M + {t['llm_params_b']}B) | "
            f"{t['tokens_per_s']:,} tokens/s, MFU {t['mfu']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: test the script")
    parser.add_argument("--photos", help="a folder of JPEGs for the embed path")
    parser.add_argument("--out", default="device_check.json")
    parser.add_argument("--peak-bf16", type=float, default=None, help="TFLOP/s, dense")
    parser.add_argument("--peak-fp32", type=float, default=None, help="TFLOP/s, dense")
    parser.add_argument("--skip", default="", help="comma-separated checks to leave out")
    args = parser.parse_args(argv)
    bf16, fp32 = peaks(args.device, args.peak_bf16, args.peak_fp32)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"device": name, "tiny": args.tiny, "peak_bf16": bf16, "peak_fp32": fp32}
    started = time.perf_counter()
    checks = [
        ("encoder", lambda: check_encoder(args, bf16)),
        ("embed_path", lambda: check_embed_path(args, result["encoder"])),
        ("dedup", lambda: check_dedup(args, bf16, fp32)),
        ("assign", lambda: check_assign(args)),
        ("training", lambda: check_training(args, bf16)),
    ]
    for key, run in checks:
        if key in skip:
            continue
        t = time.perf_counter()
        result[key] = run()
        result.setdefault("seconds", {})[key] = round(time.perf_counter() - t, 1)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")  # kept if a later one dies
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if not skip:
        print(table(result))
    return result


if __name__ == "__main__":
    main()
