"""GPU benchmark without Ray: one real-size Bunny training step, tokens/s and MFU.

    python bench/gpu_train.py                        # SigLIP-so400m tower + 1.5B Llama, both stages
    python bench/gpu_train.py --llm 3b --batch 4 --stages stage2
    python bench/gpu_train.py --tiny --device cpu    # a smoke run of the script itself

Needs only torch, transformers and peft (the accelerator machines have no Ray). Random weights
in bf16 (trainable parts in fp32 under bf16 autocast, as `condense train` runs them), random
pixels and token ids already in memory: this measures condense's training step itself (the
model's splice of image tokens, forward, backward, clipping, AdamW), with the loop's own
functions. Model FLOPs per step are counted by torch's FlopCounterMode on one step (no
activation recomputation: MFU, not HFU); MFU = FLOPs per step / seconds per step / the
GPU's dense bf16 peak (or --peak-tflops).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_embed import PEAK_TFLOPS  # noqa: E402

# SigLIP-so400m-patch14-384 (Bunny's tower): 27 layers, 729 patch tokens per image.
SO400M = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
}
LLMS = {  # Llama-architecture LLMs of the sizes Bunny uses (1.5B: Qwen2-1.5B's; 3B: Llama-3.2's)
    "1.5b": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
    },
    "3b": {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
}
TINY_VISION = {
    **SO400M,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 56,
}
TINY_LLM = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
}


def build(vision_cfg: dict, llm_cfg: dict, device: torch.device):
    from condense.train.model import PROJECTORS, VISION_TOWERS, BunnyModel, build_llm, pick

    torch.manual_seed(0)
    llm_cfg = {"model_type": "llama", "max_position_embeddings": 4096, **llm_cfg}
    # Built in place, in bf16 on a GPU (no fp32 copy first); fp32 on the CPU (no autocast there).
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device, _default_dtype(dtype):
        vision = pick(VISION_TOWERS, "hf-siglip", "vision tower")(config=vision_cfg, layer=-2)
        llm = build_llm(config=llm_cfg)
    projector = pick(PROJECTORS, "mlp2x_gelu", "projector")(
        vision.hidden_size, llm_cfg["hidden_size"]
    )
    return BunnyModel(vision, projector.to(device), llm)


class _default_dtype:
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


def batch_of(size: int, text: int, image_size: int, vocab: int, seed: int = 0) -> list:
    """`size` samples: <image> then `text` random tokens, all text trained (stage-1 style)."""
    from condense.train.templates import IGNORE, IMAGE_TOKEN

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(size):
        ids = rng.integers(3, vocab, text).tolist()
        pixels = rng.standard_normal((3, image_size, image_size)).astype(np.float32)
        out.append(([IMAGE_TOKEN, *ids], [IGNORE, *ids], pixels))
    return out


def bench_stage(stage: str, args, device: torch.device, peak: float | None) -> dict:
    """One stage's training step, timed; returns its figures (and prints its table row)."""
    from torch.utils.flop_counter import FlopCounterMode

    from condense.train.config import TrainConfig
    from condense.train.loop import (
        _forward_backward,
        checkpoint_activations,
        freeze_for_stage1,
        prepare_stage2,
    )

    vision_cfg, llm_cfg = (TINY_VISION, TINY_LLM) if args.tiny else (SO400M, LLMS[args.llm])
    model = build(vision_cfg, llm_cfg, device)
    if stage == "stage1":
        freeze_for_stage1(model)
        groups = [{"params": list(model.projector.parameters()), "lr": 5e-4}]
    else:
        lora = {"r": args.lora_r, "alpha": 2 * args.lora_r}
        cfg = TrainConfig(stage="stage2", lora=lora)
        groups = prepare_stage2(model, cfg)
    if args.gradient_checkpointing:
        from condense.train.model import base_llm

        llm = base_llm(model.llm)
        checkpoint_activations(llm)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.0)
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    batch = batch_of(args.batch, args.text, model.vision.image_size, llm_cfg["vocab_size"])
    patches = (model.vision.image_size // vision_cfg["patch_size"]) ** 2
    tokens = args.batch * (patches + args.text)  # through the LLM per step
    trained = args.batch * args.text

    def step():
        _forward_backward(model, batch, device, autocast, 1.0)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()  # also the warm-up's first step
    flops = float(counter.get_total_flops())
    for _ in range(2):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    tflops = flops / seconds / 1e12
    mfu = f"{tflops / peak:.1%}" if peak else "n/a (give --peak-tflops)"
    memory = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device.type == "cuda" else "-"
    llm_params = sum(p.numel() for p in model.llm.parameters()) / 1e9
    vision_params = sum(p.numel() for p in model.vision.parameters()) / 1e6
    print(
        f"| {stage} | {vision_params:,.0f}M + {llm_params:.2f}B | {args.batch} x "
        f"({patches} + {args.text}) | {seconds * 1e3:,.0f} | {tokens / seconds:,.0f} | "
        f"{trained / seconds:,.0f} | {tflops:,.1f} | {mfu} | {memory} |"
    )
    return {
        "stage": stage,
        "vision_params_m": round(vision_params, 1),
        "llm_params_b": round(llm_params, 3),
        "ms_per_step": round(seconds * 1e3, 1),
        "tokens_per_s": round(tokens / seconds, 1),
        "trained_tokens_per_s": round(trained / seconds, 1),
        "tflops": round(tflops, 2),
        "mfu": round(tflops / peak, 4) if peak else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", choices=sorted(LLMS), default="1.5b")
    parser.add_argument("--stages", default="stage1,stage2")
    parser.add_argument("--batch", type=int, default=8, help="samples per step (per device)")
    parser.add_argument("--text", type=int, default=512, help="text tokens per sample")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 3 warm-up)")
    parser.add_argument("--lora-r", type=int, default=128)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: test the script")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    print(f"# one Bunny training step on {name} (bf16 autocast: {device.type == 'cuda'})")
    if args.gradient_checkpointing:
        print("# activations recomputed: the FLOPs count the recomputation (HFU, not MFU)")
    print(
        "| stage | vision + LLM | batch x (image + text tokens) | ms/step | tokens/s "
        "| trained tokens/s | TFLOP/s | MFU | peak GiB |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for stage in args.stages.split(","):
        bench_stage(stage, args, device, peak)  # its model is freed when it returns
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
