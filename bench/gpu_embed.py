"""GPU benchmark without Ray: CLIP image-encoding throughput and the fraction of the GPU's peak.

    python bench/gpu_embed.py                                  # ViT-L-14, 224 px, fp16 and bf16
    python bench/gpu_embed.py --model ViT-L-14 --batch 256 --precisions bf16
    python bench/gpu_embed.py --device cpu --model configs/models/tiny-clip.json --precisions fp32

Needs only torch and open_clip (the accelerator machines have no Ray). Random weights, random
pixels already on the device: this measures the encoder itself, the ceiling for the embed
stage's GPU actors. FLOPs per image are counted by torch's FlopCounterMode on one forward pass;
the fraction of peak uses the dense tensor-core peak of the detected GPU (or --peak-tflops).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# Dense (no sparsity) fp16/bf16 tensor-core peaks, TFLOP/s.
PEAK_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H200": 989.0, "A100": 312.0}


def load(model: str, device: str):
    import open_clip

    name = model
    if model.endswith(".json"):
        open_clip.add_model_config(Path(model))
        name = Path(model).stem
    net, _, _ = open_clip.create_model_and_transforms(name, pretrained=None, device=device)
    size = net.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    return net.eval().requires_grad_(False), int(size)


def flops_per_image(net, size: int, device: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, size, size, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net.encode_image(x)
    return float(counter.get_total_flops())


def throughput(net, size: int, device: str, precision: str, batch: int, steps: int) -> float:
    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    x = torch.randn(batch, 3, size, size, device=device)
    kind = device.split(":")[0]

    def step():
        with torch.inference_mode(), torch.autocast(kind, dtype=dtype, enabled=precision != "fp32"):
            net.encode_image(x)

    for _ in range(3):  # warm-up: kernels picked, memory pooled
        step()
    if kind == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if kind == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-L-14")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["fp16", "bf16"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args()

    net, size = load(args.model, args.device)
    flops = flops_per_image(net, size, args.device)
    peak = args.peak_tflops
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    if peak is None:
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    print(f"# {args.model} at {size} px on {name}: {flops / 1e9:.1f} GFLOP per image")
    print("| precision | batch | images/s | TFLOP/s | fraction of peak |")
    print("|---|---:|---:|---:|---:|")
    for precision in args.precisions:
        rate = throughput(net, size, args.device, precision, args.batch, args.steps)
        tflops = rate * flops / 1e12
        frac = f"{tflops / peak:.0%}" if peak else "n/a (give --peak-tflops)"
        print(f"| {precision} | {args.batch} | {rate:,.0f} | {tflops:.1f} | {frac} |")


if __name__ == "__main__":
    main()
