"""Benchmark: what the bad-input checks cost on good data, and the memory of the worst inputs.

    python bench/bench_bad_inputs.py [--samples 2000 --repeats 5 --size 256]

1. Decode speed on a shard of good samples (real photos from scikit-image, JPEG, with captions
   and .json metadata), in one process, interleaved, best of `--repeats`:
   - baseline: what decoding cost before the checks: `tarfile` in stream mode, members grouped
     by key, the caption decoded and the .json parsed, Pillow opening any format, load,
     convert to RGB, open_clip's transform;
   - condense: `decode_shard`, the decode step of the embed stage (condense's tar parser with
     its bounds, id and url rules, web formats only, pixel and aspect guards before decoding,
     EXIF orientation, the poison guard's two writes per sample), with the same transform.
   Target: condense >= 0.95x the baseline's samples/s (the checks under 5% of decode time).
2. The peak memory (RSS, each in a fresh process) of decoding the worst inputs the battery in
   tests/ holds, against a good shard's: a 1 x 200,000 PNG, a 20,000 x 20,000 PNG bomb, a
   4 MB pax header, 100,000 members under one key, a 60 MiB caption, a gzip shard.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MODEL = str(REPO / "configs" / "models" / "tiny-clip.json")


def photos(size: int) -> list[bytes]:
    """JPEGs of the photos inside scikit-image, cut into `size`-pixel crops."""
    from PIL import Image
    from skimage import data

    out = []
    for name in (
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "hubble_deep_field",
        "immunohistochemistry",
    ):
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        w, h = image.size
        for x in range(0, max(1, w - size), size // 2):
            for y in range(0, max(1, h - size), size // 2):
                buf = io.BytesIO()
                image.crop((x, y, x + size, y + size)).save(buf, format="JPEG", quality=90)
                out.append(buf.getvalue())
    return out


def good_shard(path: Path, samples: int, size: int) -> None:
    images = photos(size)
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            key = f"{i:09d}"
            meta = json.dumps({"url": f"http://example.com/{key}.jpg", "key": key}).encode()
            members = (
                ("jpg", images[i % len(images)]),
                ("txt", f"a photo {i}".encode()),
                ("json", meta),
            )
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def baseline(path: Path, transform) -> int:
    """Decoding as it was without the checks: tarfile, Pillow on any format, RGB, transform."""
    from PIL import Image

    n, key, members = 0, None, {}

    def finish(members):
        image = Image.open(io.BytesIO(members["jpg"]))
        image.load()
        transform(image.convert("RGB"))
        members["txt"].decode("utf-8")
        json.loads(members["json"])

    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            stem, ext = member.name.split(".", 1)
            if key is not None and stem != key:
                finish(members)
                n, members = n + 1, {}
            key = stem
            members[ext] = tar.extractfile(member).read()
    finish(members)
    return n + 1


def condense(path: Path, scratch: Path) -> int:
    from condense.readers.shards import ShardLimits
    from condense.readers.webdataset import Shard
    from condense.stages.embed.clip import ModelConfig
    from condense.stages.embed.images import decode_shard

    item = Shard(part="p", source=path.name, path=str(path))
    model = ModelConfig(name=MODEL, batch_size=64)
    return sum(
        len(b["sample_id"]) for b in decode_shard(item, model, None, str(scratch), ShardLimits())
    )


def speed(args) -> None:
    from condense.stages.embed.images import _transform

    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "good.tar"
        good_shard(shard, args.samples, args.size)
        transform = _transform(MODEL, None)
        times = {"baseline": [], "condense": []}
        for _ in range(args.repeats):
            for name, run in (
                ("baseline", lambda: baseline(shard, transform)),
                ("condense", lambda: condense(shard, Path(tmp) / "scratch")),
            ):
                start = time.perf_counter()
                n = run()
                times[name].append(time.perf_counter() - start)
                assert n == args.samples, (name, n)
        best = {k: min(v) for k, v in times.items()}
        print(
            f"decode of {args.samples:,} good {args.size}-px JPEG samples, best of {args.repeats}:"
        )
        for name in ("baseline", "condense"):
            runs = ", ".join(f"{t:.2f}" for t in times[name])
            print(
                f"  {name:9s} {best[name]:6.2f} s  {args.samples / best[name]:7.0f} samples/s  (runs {runs})"
            )
        ratio = best["baseline"] / best["condense"]
        print(f"  ratio (condense / baseline samples/s): {ratio:.3f}x  (target >= 0.95x)")


WORST = {
    "good shard (2,000 samples)": "good",
    "1 x 200,000 PNG": "thin",
    "20,000 x 20,000 PNG bomb": "bomb",
    "4 MB pax header": "pax",
    "100,000 members under one key": "members",
    "60 MiB caption": "caption",
    "gzip shard (2,000 samples)": "gzip",
}


def make_worst(kind: str, path: Path, size: int) -> None:
    import gzip

    from PIL import Image

    if kind in ("good", "gzip"):
        good_shard(path, 2000, size)
        if kind == "gzip":
            path.write_bytes(gzip.compress(path.read_bytes()))
        return
    members: list[tuple[str, bytes]] = []
    if kind in ("thin", "bomb"):
        buf = io.BytesIO()
        Image.new(
            "L" if kind == "thin" else "1", (1, 200_000) if kind == "thin" else (20_000, 20_000)
        ).save(buf, format="PNG")
        members = [("k.png", buf.getvalue()), ("k.txt", b"c")]
    elif kind == "caption":
        members = [("k.jpg", photos(size)[0]), ("k.txt", b"x" * (60 << 20))]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        if kind == "pax":
            info = tarfile.TarInfo("p" * 4_000_000 + ".jpg")
            info.size = 0
            tar.addfile(info)
        if kind == "members":
            for i in range(100_000):
                tar.addfile(tarfile.TarInfo(f"k.{i}"))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _status(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: now; VmHWM: the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_child(path: str) -> None:
    """In a fresh process: decode one shard; print its RSS before and its peak while decoding.
    (ru_maxrss would not do: Linux carries it over from the forking parent.)"""
    from condense.stages.embed.images import _transform

    _transform(MODEL, None)  # imports and the transform cost the same for every input
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = condense(Path(path), Path(tmp) / "scratch")
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {"rows": rows, "before_kib": before, "peak_kib": _status("VmHWM"), "seconds": seconds}
        )
    )


def memory(args) -> None:
    print("\npeak memory of decoding each input in a fresh process (the input built beforehand):")
    print(
        f"  {'input':34s} {'bytes':>11s} {'rows':>5s} {'RSS before':>10s} {'peak':>9s} "
        f"{'growth':>8s} {'seconds':>8s}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for label, kind in WORST.items():
            path = Path(tmp) / f"{kind}.tar"
            make_worst(kind, path, args.size)
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(path)],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            growth = (r["peak_kib"] - r["before_kib"]) / 1024
            print(
                f"  {label:34s} {path.stat().st_size:11,d} {r['rows']:5d} "
                f"{r['before_kib'] / 1024:6.0f} MiB {r['peak_kib'] / 1024:5.0f} MiB "
                f"{growth:4.0f} MiB {r['seconds']:8.2f}"
            )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        peak_child(args.child)
        return
    speed(args)
    memory(args)


if __name__ == "__main__":
    main()
