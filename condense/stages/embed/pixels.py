"""Images decoded and preprocessed on the encoder's device (nvJPEG on a GPU), and read-ahead.

`DevicePixels` takes a batch as `decode_shard(device_jpegs=True)` makes it: per row either a
tensor Pillow already preprocessed or a plain JPEG's bytes. The JPEGs are decoded together by
torchvision's `decode_jpeg` on the device, then resized, cropped and normalised there with the
geometry open_clip's transform uses (the shorter side to the model's size, a centre crop; or a
squash); the rows Pillow made are copied over from pinned memory. On a GPU each batch is
decoded on a stream of its own, beside the encoder's work on the batch before. A batch the
device decoder refuses is decoded image by image, and an image it still refuses goes to
Pillow, which may drop it by reason. Callable without Ray: `bench/device_check.py` times it as is.

On a CPU the same code runs with torchvision's CPU decoder (`embed.model.decode: device`), which
is how it is tested here. Pixels differ from Pillow's within the decoders' and resamplers'
tolerance (docs/benchmarks.md gives the cosine between the two paths' embeddings).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

import numpy as np


def device_decode_supported(cfg: dict) -> bool:
    """Whether a model's preprocessing (a `preprocess_config`) can run on the device: a squash,
    or the shorter side to a square size and a centre crop. The `longest` mode pads with
    open_clip's own transform and stays with Pillow."""
    mode, size = cfg["resize_mode"], cfg["size"]
    return mode == "squash" or (mode == "shortest" and size[0] == size[1])


class DevicePixels:
    """Batches of JPEG bytes and preprocessed tensors -> one normalised batch on the device."""

    def __init__(self, cfg: dict, device: str, transform, limits):
        import torch
        from torchvision.transforms import InterpolationMode

        if not device_decode_supported(cfg):
            raise ValueError(
                f"resize mode {cfg['resize_mode']!r} at size {cfg['size']} cannot be done on "
                "the device; use embed.model.decode: pil"
            )
        self.torch, self.device, self.cfg = torch, device, cfg
        self.transform, self.limits = transform, limits  # Pillow's path, for refused images
        self.mode = (
            InterpolationMode.BILINEAR
            if cfg["interpolation"] == "bilinear"
            else InterpolationMode.BICUBIC
        )
        self.mean = torch.tensor(cfg["mean"], device=device).view(3, 1, 1)
        self.std = torch.tensor(cfg["std"], device=device).view(3, 1, 1)
        self.cuda = device.startswith("cuda")
        # On a GPU, batches are decoded on a stream of their own, beside the encoder's work on
        # the batch before (the encoder's results stay on the device until its shard is done).
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def __call__(self, rows: list) -> tuple[object, np.ndarray, dict[str, int]]:
        """(pixels on the device, indices of the rows kept, drop counts of the rows refused)."""
        if self.stream is None:
            return self._batch(rows)
        torch = self.torch
        with torch.cuda.stream(self.stream):
            pixels, keep, dropped = self._batch(rows)
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)  # the encoder starts once the pixels are there
        pixels.record_stream(current)  # and their memory is not reused before it is done
        return pixels, keep, dropped

    def _batch(self, rows: list) -> tuple[object, np.ndarray, dict[str, int]]:
        torch = self.torch
        jpegs = [i for i, r in enumerate(rows) if isinstance(r, bytes | bytearray)]
        decoded = self._decode([rows[i] for i in jpegs])
        out: list = [None] * len(rows)
        dropped: dict[str, int] = {}
        for i, image in zip(jpegs, decoded, strict=True):
            out[i] = self._preprocess(image) if image is not None else self._pillow(rows[i])
            if isinstance(out[i], str):  # Pillow's drop reason
                dropped[out[i]] = dropped.get(out[i], 0) + 1
                out[i] = None
        for i, r in enumerate(rows):
            if out[i] is None and not isinstance(r, bytes | bytearray):
                out[i] = self._to_device(r)
        keep = np.array([i for i, x in enumerate(out) if x is not None], dtype=np.int64)
        if not len(keep):
            size = self.cfg["size"]
            return torch.zeros((0, 3, *size), device=self.device), keep, dropped
        return torch.stack([out[i] for i in keep]), keep, dropped

    def _decode(self, data: list) -> list:
        """Each JPEG as a uint8 RGB tensor on the device, or None where the decoder refused."""
        import warnings

        with warnings.catch_warnings():  # torchvision 0.29 points at TorchCodec, on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            return self._decode_jpegs(data)

    def _decode_jpegs(self, data: list) -> list:
        from torchvision.io import ImageReadMode, decode_jpeg

        if not data:
            return []
        torch = self.torch
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
        try:  # one call for the batch (nvJPEG's batched decode on a GPU)
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad image fails the batch: find it
            out = []
            for t in tensors:
                try:
                    out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out

    def _preprocess(self, image):
        """uint8 (3, h, w) -> normalised float (3, size, size), open_clip's geometry."""
        from torchvision.transforms.v2 import functional as F

        size = list(self.cfg["size"])
        if self.cfg["resize_mode"] == "squash":
            image = F.resize(image, size, interpolation=self.mode, antialias=True)
        else:  # the shorter side to size, as torchvision's Resize(int) computes it, then crop
            image = F.resize(image, size[:1], interpolation=self.mode, antialias=True)
            image = F.center_crop(image, size)
        return (image.float() / 255.0 - self.mean) / self.std

    def _pillow(self, data: bytes):
        """A JPEG the device refused, through Pillow: a preprocessed tensor or a drop reason."""
        from condense.cores.images import decode_rgb

        image, reason = decode_rgb(data, self.limits.max_pixels, self.limits.max_aspect_ratio)
        return reason if image is None else self._to_device(self.transform(image))

    def _to_device(self, tensor):
        if self.cuda:
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor


_DONE = object()


def read_ahead(batches: Iterable, depth: int = 2) -> Iterator:
    """`batches`, made by a thread that keeps up to `depth` ready: the tar is read and the
    images Pillow decodes are decoded while the device works on the batch before. An error in
    the thread is raised here, at the batch where it happened."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer stopped

    def fill() -> None:
        try:
            for batch in batches:
                if not put((batch, None)):
                    return
            put((_DONE, None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            put((_DONE, error))

    thread = threading.Thread(target=fill, name="condense-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            batch, error = ready.get()
            if error is not None:
                raise error
            if batch is _DONE:
                return
            yield batch
    finally:
        stop.set()
        thread.join(timeout=5)
