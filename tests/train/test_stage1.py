"""The embedded Bunny trainer, stage 1, on tiny random models: masking, what trains, the loss."""

from collections import Counter

import numpy as np
import pytest
import torch

from condense.train.config import TrainConfig
from condense.train.data import shard_samples
from condense.train.loop import save_projector, train
from condense.train.model import PROJECTORS, VISION_TOWERS, BunnyModel, build_llm, pick
from condense.train.templates import IGNORE, IMAGE_TOKEN, encode
from condense.train.tokenizers import byte_tokenizer

VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
LLM = {
    "model_type": "llama",
    "vocab_size": 259,
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
    # Wide enough initial weights that a frozen lm_head (after RMSNorm) can separate
    # tokens: at the default 0.02 no adapter could bring the loss much below ln(vocab).
    "initializer_range": 0.5,
}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    vision = pick(VISION_TOWERS, "hf-clip", "vision tower")(config=VISION, layer=-2)
    llm = build_llm(config=LLM)
    projector = pick(PROJECTORS, "mlp2x_gelu", "projector")(vision.hidden_size, LLM["hidden_size"])
    return BunnyModel(vision, projector, llm)


def test_plain_and_bunny_masks():
    tok = byte_tokenizer()
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"}]
    ids, labels, truncated = encode(turns, "plain", tok, 100)
    cat = tok("a cat\n", add_special_tokens=False)["input_ids"]
    # plain: the image alone as the prompt, then the caption and "\n", all of it trained.
    assert ids == [IMAGE_TOKEN, *cat] and labels == [IGNORE, *cat] and not truncated
    ids, labels, _ = encode(turns, "bunny", tok, 1000)
    answer = tok("a cat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    trained = [x for x in labels if x != IGNORE]
    assert trained == answer and ids[-len(answer) :] == answer  # only the answer and its end
    assert ids[0] == tok.bos_token_id and ids.count(IMAGE_TOKEN) == 1
    ids, labels, truncated = encode(turns, "bunny", tok, 20)
    assert truncated and len(ids) == len(labels) == 20
    with pytest.raises(
        ValueError, match="unknown template 'nope': use one of bunny, chatml, llama3, phi3, plain"
    ):
        encode(turns, "nope", tok, 10)
    with pytest.raises(ValueError, match="unknown vision tower"):
        pick(VISION_TOWERS, "clip", "vision tower")


def test_image_tokens_are_spliced_in_and_never_labelled():
    model = tiny_model()
    tok = byte_tokenizer()
    ids, labels, _ = encode(
        [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "hi"}], "plain", tok, 50
    )
    batch = model.merge([ids, ids[1:]], [labels, labels[1:]], torch.zeros(1, 3, 32, 32))
    patches = (32 // 8) ** 2
    assert batch["inputs_embeds"].shape[1] == len(ids) - 1 + patches
    assert (batch["labels"][0, :patches] == IGNORE).all()
    assert batch["attention_mask"][1].sum() == len(ids) - 1  # the second row is padding after
    with pytest.raises(ValueError, match="images"):
        model.merge([ids, ids], [labels, labels], torch.zeros(1, 3, 32, 32))


def captions(n):
    import io

    from PIL import Image

    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), (i * 30 % 255, 80, 160)).save(buf, "PNG")
        out.append(
            (
                [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": f"colour {i}"}],
                buf.getvalue(),
            )
        )
    return out


def test_stage1_trains_only_the_projector_and_the_loss_falls(tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = captions(4)
    cfg = TrainConfig(lr=2e-2, global_batch=4, per_device_batch=2, epochs=30, warmup_ratio=0.03)
    lines: list[str] = []
    result = train(model, lambda: data, len(data), byte_tokenizer(), 32, cfg, log=lines.append)
    progress = [line for line in lines if line.startswith("[train] step ")]
    assert [line.split(":")[0] for line in progress] == [
        f"[train] step {n}/30" for n in (10, 20, 30)
    ]
    assert "tokens/s" in progress[-1] and progress[-1].endswith("0 s left")
    assert result.steps == 30 and result.trainable == sum(
        p.numel() for p in model.projector.parameters()
    )
    # Only the image tokens can move, in front of a frozen random LLM: the loss falls by what
    # the projector can steer, and stays put when nothing trains.
    assert sum(result.losses[-5:]) / 5 < 0.96 * result.losses[0]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("projector.") for k in changed)
    assert not model.llm.training and not model.vision.training and model.projector.training
    path = save_projector(model, tmp_path / "stage1")
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == {f"projector.{k}" for k in model.projector.state_dict()}


def test_stage1_reads_the_shards_a_run_exported(demo_run):
    shards = sorted((demo_run / "export" / "shards").glob("*.tar"))
    skipped: Counter = Counter()
    data = list(shard_samples(shards, skipped))
    assert len(data) == 4 and not skipped
    model = tiny_model()
    cfg = TrainConfig(global_batch=4, per_device_batch=2, epochs=1)
    result = train(model, lambda: data, len(data), byte_tokenizer(), 32, cfg, log=lambda _: None)
    assert result.samples == 4 and result.steps == 1 and result.tokens > 0


def test_condense_train_stage1_command(demo_run, capsys):
    import json

    from condense.cli import main
    from tests.conftest import REPO

    tiny = str(REPO / "configs" / "train" / "stage1-tiny.yaml")
    assert main(["train", "stage1", tiny, "--run-dir", str(demo_run)]) == 0
    out = demo_run / "train" / "stage1"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["samples"] == 4 and state["steps"] == 1 and state["trainable_parameters"] > 0
    assert (out / "mm_projector.safetensors").exists() and (out / "config.yaml").exists()
    assert "3,936 trainable parameters" in capsys.readouterr().out
    assert (
        main(["train", "stage1", tiny, "--run-dir", str(demo_run), "--set", "vision.name=clip"])
        == 2
    )
    assert "unknown vision tower 'clip': use one of hf-clip, hf-siglip" in capsys.readouterr().err
    # Checked before any Ray worker starts: a global batch that workers cannot split evenly.
    odd = ["--workers", "3", "--set", "global_batch=4", "--set", "per_device_batch=1"]
    assert main(["train", "stage1", tiny, "--run-dir", str(demo_run), *odd]) == 2
    assert "global_batch 4 is not a multiple of per_device_batch 1 x 3" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("template", "text", "answer_end"),
    [
        (
            "phi3",
            "<|system|>\nSYS<|end|>\n<|user|>\n<image>\nQ1<|end|>\n<|assistant|>\nA1<|end|>\n"
            "<|user|>\nQ2<|end|>\n<|assistant|>\nA2<|end|>\n",
            "<|end|>\n",
        ),
        (
            "llama3",
            "<|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n<image>\nQ1<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>",
            "<|eot_id|>",
        ),
        (
            "chatml",
            "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n<image>\nQ1<|im_end|>\n"
            "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
            "<|im_start|>assistant\nA2<|im_end|>\n",
            "<|im_end|>\n",
        ),
    ],
)
def test_chat_templates_text_and_masks(template, text, answer_end):
    """The whole conversation reads as the template writes it; only answers and their turn
    ends are trained on."""
    from dataclasses import replace

    import condense.train.templates as T

    original = T.TEMPLATES[template]
    t = replace(original, system=original.system.replace(T.SYSTEM, "SYS"))  # a short system
    tok = byte_tokenizer()
    turns = [
        {"from": "human", "value": "<image>\nQ1"},
        {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2"},
        {"from": "gpt", "value": "A2"},
    ]
    ids, labels, _ = encode(turns, t, tok, 4000)
    bos = [tok.bos_token_id] if t.bos else []  # chatml's bos would be <|im_start|> again
    before, after = text.split("<image>")
    want = [*bos, *tok(before, add_special_tokens=False)["input_ids"], IMAGE_TOKEN]
    want += tok(after, add_special_tokens=False)["input_ids"]
    assert ids == want
    trained = tok.decode([x for x in labels if x != IGNORE])
    assert trained == f"A1{answer_end}A2{answer_end}"


@pytest.mark.parametrize("template", ["plain", "bunny", "phi3", "llama3", "chatml"])
def test_chat_prompt_is_the_training_text_up_to_the_answer(template):
    from condense.train.templates import prompt

    tok = byte_tokenizer()
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "a cat"}]
    ids, labels, _ = encode(turns, template, tok, 4000)
    asked = prompt("<image>\nWhat?", template, tok)
    assert ids[: len(asked)] == asked
    first_trained = next(i for i, x in enumerate(labels) if x != IGNORE)
    assert first_trained == len(asked)  # the model answers exactly where training taught it


def test_open_clip_tower_gives_the_patch_tokens_of_its_layer():
    """EVA-CLIP and other open_clip towers: layer -2 of a 2-block ViT is block 0's output."""
    from tests.conftest import REPO

    tiny = str(REPO / "configs" / "models" / "tiny-clip.json")
    tower = pick(VISION_TOWERS, "open-clip", "vision tower")(model=tiny, layer=-2)
    x = torch.randn(2, 3, 64, 64)
    vis = tower.visual
    tokens = vis.conv1(x).flatten(2).transpose(1, 2)
    cls = vis.class_embedding.expand(2, 1, -1)
    tokens = vis.ln_pre(torch.cat([cls, tokens], 1) + vis.positional_embedding)
    want = vis.transformer.resblocks[0](tokens)[:, 1:]  # the class token dropped
    torch.testing.assert_close(tower(x), want)
    assert tower.hidden_size == 64 and tower.image_size == 64
    # It trains like any tower: stage 1 moves only the projector.
    llm = build_llm(config=LLM)
    projector = pick(PROJECTORS, "mlp2x_gelu", "projector")(64, LLM["hidden_size"])
    model = BunnyModel(tower, projector, llm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(global_batch=2, per_device_batch=2, epochs=2)
    data = captions(2)
    result = train(model, lambda: data, 2, byte_tokenizer(), 64, cfg, log=lambda _: None)
    assert result.steps == 2 and result.samples == 4
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("projector.") for k in changed)


def test_pixels_are_normalised_as_the_tower_was_trained():
    import io

    from PIL import Image

    from condense.train.data import pixels

    siglip = pick(VISION_TOWERS, "hf-siglip", "vision tower")(config=VISION)
    clip = pick(VISION_TOWERS, "hf-clip", "vision tower")(config=VISION)
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (255, 255, 255)).save(buf, "PNG")
    white, _ = pixels(buf.getvalue(), 32, siglip.mean, siglip.std)
    assert white.shape == (3, 32, 32) and np.allclose(white, 1.0)  # (1 - 0.5) / 0.5
    white, _ = pixels(buf.getvalue(), 32, clip.mean, clip.std)
    assert np.allclose(white[0], (1 - 0.48145466) / 0.26862954)


def test_the_llm_runs_the_attention_kernel_asked_for():
    from condense.train.config import TrainConfig

    for attention in ("sdpa", "eager"):
        llm = build_llm(config=LLM, attention=attention)
        assert llm.config._attn_implementation == attention
    assert TrainConfig().llm.attention == "sdpa"  # PyTorch's fused attention by default
    with pytest.raises(ValueError, match="attention"):
        TrainConfig(llm={"attention": "xformers"})
