"""The demo's corpus: real photos shipped inside installed packages, with planted near-duplicates.

Photos come from scikit-image's `skimage/data` folder and scikit-learn's sample images (no
download). Each photo gives distinct images (the photo whole, and a 3 x 3 grid of its tiles unless
the photo is mirror-symmetric or a texture, whose tiles look alike); about 60% of those get one
or two planted near-duplicates: a re-compressed JPEG, a brightness or colour shift, a 6% crop,
a horizontal flip. Two pairs of distinct photos in the packages are near-duplicates in the
wild (a chessboard saved in colour and in gray; the two views of a stereo motorcycle pair), and
the truth says so. A few urls are broken on purpose: missing files (404) and garbage bytes.

`build_corpus(folder, base_url)` writes the images into folder/images (served at base_url),
`urls.parquet` (url, caption, sample_id) and `truth.parquet` (sample_id, group_id: -1 for an image without
duplicates), which `condense report` scores dedup against.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

CAPTIONS = {
    "astronaut": "astronaut Eileen Collins in her flight suit",
    "brick": "a red brick wall",
    "camera": "a man with a camera on a tripod, black and white",
    "cell": "a cell under the microscope",
    "chelsea": "Chelsea the cat",
    "chessboard_GRAY": "a chessboard pattern",
    "chessboard_RGB": "a chessboard pattern",
    "clock_motion": "a clock, blurred by motion",
    "coffee": "a cup of coffee on a saucer",
    "coins": "old coins on a table",
    "color": "a colour wheel",
    "grass": "a patch of grass",
    "gravel": "gravel on the ground",
    "horse": "the silhouette of a horse",
    "hubble_deep_field": "the Hubble deep field, galaxies in the dark",
    "ihc": "a stained tissue sample",
    "logo": "the scikit-image logo",
    "moon": "the surface of the moon",
    "motorcycle_left": "a motorcycle in a garage",
    "motorcycle_right": "a motorcycle in a garage",
    "page": "a printed page of text",
    "phantom": "a Shepp-Logan phantom",
    "retina": "a photograph of a human retina",
    "rocket": "a rocket on its launch pad",
    "text": "text on a sign",
    "china": "a pagoda in China",
    "flower": "a flower in bloom",
}
TEXTURES = {"brick", "grass", "gravel", "chessboard_GRAY", "chessboard_RGB"}
SYMMETRIC = {"phantom", "retina", "clock_motion", "page", "moon", "coins", "cell"}
SAME_PHOTO = {"chessboard_GRAY": "chessboard_RGB", "motorcycle_right": "motorcycle_left"}
BROKEN = {"missing": 3, "garbage": 2}
GRID = 3  # tiles per side


def photos() -> list[tuple[str, object]]:
    """(name, PIL RGB image) of every usable photo shipped with scikit-image and scikit-learn."""
    from PIL import Image

    folders = []
    for module, sub in (("skimage", "data"), ("sklearn", "datasets/images")):
        try:
            package = __import__(module)
        except ImportError as e:
            raise RuntimeError(
                f"the demo builds its corpus from {module}'s sample photos: pip install "
                "'condense[demo]'"
            ) from e
        folders.append(Path(package.__file__).parent / sub)
    found = []
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.stem in CAPTIONS and path.suffix in (".png", ".jpg"):
                image = Image.open(path)
                found.append((path.stem, image.convert("RGB")))
    return found


def pieces(name: str, image) -> list[tuple[str, object]]:
    """Distinct images from one photo: whole, plus a 3 x 3 grid of tiles for photos that are
    neither a texture nor mirror-symmetric."""
    out = [(name, square(image))]
    if name not in TEXTURES and name not in SYMMETRIC and name not in SAME_PHOTO:
        w, h = image.size
        for tx in range(GRID):
            for ty in range(GRID):
                box = (tx * w // GRID, ty * h // GRID, (tx + 1) * w // GRID, (ty + 1) * h // GRID)
                out.append((f"{name}-tile{tx}{ty}", square(image.crop(box))))
    return out


def square(image, size: int = 320):
    return image.resize((size, size))


def jpeg(image, quality: int):
    from PIL import Image

    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def variants() -> dict[str, object]:
    from PIL import ImageEnhance, ImageOps

    def crop(image):
        w, h = image.size
        dx, dy = int(w * 0.03), int(h * 0.03)
        return image.crop((dx, dy, w - dx, h - dy)).resize(image.size)

    return {
        "recompressed": lambda im: jpeg(im, 20),
        "brighter": lambda im: ImageEnhance.Brightness(im).enhance(1.08),
        "faded": lambda im: ImageEnhance.Color(im).enhance(0.7),
        "cropped": crop,
        "flipped": ImageOps.mirror,
    }


def build_corpus(folder: Path, seed: int = 0, base_url: str = "http://127.0.0.1:0") -> dict:
    """Write the images into folder/images, plus urls.parquet and truth.parquet. Returns counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    images = Path(folder) / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []  # (sample_id, file, caption)
    truth: dict[str, str] = {}  # sample_id -> the distinct image it copies
    makers = variants()
    for name, photo in photos():
        for piece, image in pieces(name, photo):
            caption = CAPTIONS[name] if piece == name else f"{CAPTIONS[name]} (detail)"
            image.save(images / f"{piece}.jpg", "JPEG", quality=90)
            rows.append((piece, f"{piece}.jpg", caption))
            truth[piece] = SAME_PHOTO.get(piece, piece)
            if rng.random() < 0.6:
                for kind in rng.choice(sorted(makers), rng.integers(1, 3), replace=False):
                    sample_id = f"{piece}-{kind}"
                    makers[kind](image).save(images / f"{sample_id}.jpg", "JPEG", quality=90)
                    rows.append((sample_id, f"{sample_id}.jpg", caption))
                    truth[sample_id] = truth[piece]
    for kind, count in BROKEN.items():
        for i in range(count):
            sample_id = f"broken-{kind}-{i}"
            if kind == "garbage":
                (images / f"{sample_id}.jpg").write_bytes(b"these bytes are not an image")
            rows.append((sample_id, f"{sample_id}.jpg", "a broken link"))
    order = rng.permutation(len(rows))  # a crawl does not list copies next to their original
    rows = [rows[i] for i in order]
    urls = pa.table(
        {
            "url": [f"{base_url}/{file}" for _, file, _ in rows],
            "caption": [caption for _, _, caption in rows],
            "sample_id": [sample_id for sample_id, _, _ in rows],
        }
    )
    path = Path(folder) / "urls.parquet"
    if not (path.exists() and pq.read_table(path).equals(urls)):  # unchanged: reruns skip
        pq.write_table(urls, path)
    ids = sorted(truth)
    originals = [truth[i] for i in ids]
    sizes = {o: originals.count(o) for o in set(originals)}
    names = sorted(sizes)
    group = [names.index(o) if sizes[o] > 1 else -1 for o in originals]
    pq.write_table(
        pa.table({"sample_id": ids, "group_id": pa.array(group, pa.int64())}),
        Path(folder) / "truth.parquet",
    )
    return {
        "rows": len(rows),
        "distinct": len(sizes),
        "planted_duplicates": sum(s - 1 for s in sizes.values()),
        "broken": sum(BROKEN.values()),
    }
