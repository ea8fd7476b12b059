"""Stage 2 on tiny random models: LoRA on the LLM's linear layers (lm_head excepted) and the
projector train, nothing else; text-only samples mix with image samples; the loss falls."""

import io
import json

import pytest
import torch
from PIL import Image

from condense.train.config import TrainConfig
from condense.train.data import json_samples
from condense.train.loop import Checkpointer, train
from condense.train.tokenizers import byte_tokenizer
from tests.train.test_stage1 import tiny_model


def llava_json(folder):
    (folder / "images").mkdir(parents=True)
    entries = []
    for i in range(3):
        buf = io.BytesIO()
        Image.new("RGB", (36, 36), (40 * i, 120, 200)).save(buf, "PNG")
        (folder / "images" / f"{i}.png").write_bytes(buf.getvalue())
        entries.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is it?"},
                    {"from": "gpt", "value": f"shade {i}"},
                ],
            }
        )
    entries.append(  # text only
        {
            "id": "t",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
        }
    )
    entries.append(
        {"id": "m", "image": "missing.png", "conversations": entries[0]["conversations"]}
    )
    entries.append({"id": "x", "conversations": entries[0]["conversations"]})  # <image>, no image
    (folder / "data.json").write_text(json.dumps(entries))
    return folder / "data.json", folder / "images"


def stage2_config(**overrides) -> TrainConfig:
    """Stage 2 settings for the tiny model: rates high enough to move in a few steps."""
    settings = dict(
        stage="stage2",
        template="bunny",
        lr=1e-2,
        mm_projector_lr=1e-3,
        global_batch=4,
        per_device_batch=2,
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        max_length=512,
    )
    if "lora_dropout" in overrides:
        settings["lora"] = {**settings["lora"], "dropout": overrides.pop("lora_dropout")}
    return TrainConfig(**{**settings, **overrides})


def base_weights(model):
    """The LLM's own weights by their original names (peft renames wrapped layers)."""
    from condense.train.model import base_llm

    llm = base_llm(model.llm)
    return {
        n.replace(".base_layer", ""): p.detach().clone()
        for n, p in llm.named_parameters()
        if "lora_" not in n
    }


def run_stage2(tmp_path, unfreeze_vision=False, epochs=20):
    from collections import Counter

    path, images = llava_json(tmp_path)
    skipped = Counter()
    data = list(json_samples(path, images, skipped))
    assert len(data) == 4 and skipped == {"missing_image": 1, "image_count_mismatch": 1}
    model = tiny_model()
    before = {
        "llm": base_weights(model),
        "vision": {k: v.clone() for k, v in model.vision.state_dict().items()},
        "projector": {k: v.clone() for k, v in model.projector.state_dict().items()},
    }
    cfg = stage2_config(epochs=epochs, unfreeze_vision=unfreeze_vision)
    result = train(model, lambda: data, len(data), byte_tokenizer(), 32, cfg, log=lambda _: None)
    return model, before, result


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_stage2_trains_lora_and_projector_only(tmp_path):
    model, before, result = run_stage2(tmp_path)
    assert not changed(before["llm"], base_weights(model))  # base LLM bit-identical
    assert not changed(before["vision"], model.vision.state_dict())
    assert changed(before["projector"], model.projector.state_dict())
    lora = [n for n, p in model.llm.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    assert not any("lm_head" in n for n in lora)
    assert result.trainable == sum(
        p.numel() for p in model.llm.parameters() if p.requires_grad
    ) + sum(p.numel() for p in model.projector.parameters())
    assert sum(result.losses[-3:]) / 3 < 0.5 * result.losses[0]  # over-fits a tiny batch


def test_stage2_can_unfreeze_the_vision_tower(tmp_path):
    model, before, _ = run_stage2(tmp_path, unfreeze_vision=True, epochs=2)
    assert changed(before["vision"], model.vision.state_dict())
    assert not changed(before["llm"], base_weights(model))


def test_condense_train_stage2_command(demo_run, tmp_path, capsys):
    """stage1 then stage2 on a run: the adapter in Hugging Face layout, the projector, counts."""
    from condense.cli import main
    from tests.conftest import REPO

    stage1 = str(REPO / "configs" / "train" / "stage1-tiny.yaml")
    stage2 = str(REPO / "configs" / "train" / "stage2-tiny.yaml")
    path, images = llava_json(tmp_path)
    run = ["--run-dir", str(demo_run), "--set", f"data.llava_json={path}"]
    run += ["--set", f"data.image_folder={images}"]
    missing = ["--set", f"projector_from={tmp_path / 'none.safetensors'}"]
    assert main(["train", "stage2", stage2, *run, *missing]) == 2
    assert "starts from stage 1's projector" in capsys.readouterr().err
    assert main(["train", "stage1", stage1, "--run-dir", str(demo_run)]) == 0
    assert main(["train", "stage2", stage2, *run]) == 0
    out = demo_run / "train" / "stage2"
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "mm_projector.safetensors").exists()
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["samples"] == 4 and state["skipped"] == {
        "missing_image": 1,
        "image_count_mismatch": 1,
    }
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and "lm_head" not in str(config["target_modules"])
    # The trained stage reloads and answers (a tiny random model: any text, but text).
    image = tmp_path / "images" / "0.png"
    assert main(["chat", "--model", str(out), "--image", str(image), "What colour is it?"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["chat", "--model", str(tmp_path), "--image", str(image), "Hi"]) == 2
    assert "not a trained stage" in capsys.readouterr().err


@pytest.mark.parametrize("stop_at", [3, 4])  # inside the first epoch; at its end
def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, stop_at):
    from collections import Counter

    path, images = llava_json(tmp_path)
    data = list(json_samples(path, images, Counter()))

    def run(checkpoints, **kw):
        model = tiny_model()
        resume = kw.pop("resume", False)
        cfg = stage2_config(
            global_batch=1, per_device_batch=1, epochs=2, lora_dropout=0.1, save_every=2, **kw
        )
        ck = Checkpointer(checkpoints, resume=resume)
        result = train(
            model, lambda: data, len(data), byte_tokenizer(), 32, cfg, lambda _: None, None, ck
        )
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return result, weights

    whole, want = run(tmp_path / "a")
    assert whole.steps == 8
    first, _ = run(tmp_path / "b", max_steps=stop_at)
    assert first.steps == stop_at
    resumed, got = run(tmp_path / "b", resume=True)
    assert resumed.steps == 8 and resumed.samples == whole.samples
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-5)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_merged_llm_answers_like_the_adapter(demo_run, tmp_path, capsys):
    """merge: true saves the LLM with the adapter folded in; chat gives the same answer."""
    import shutil

    from condense.cli import main
    from tests.conftest import REPO

    stage1 = str(REPO / "configs" / "train" / "stage1-tiny.yaml")
    stage2 = str(REPO / "configs" / "train" / "stage2-tiny.yaml")
    path, images = llava_json(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(demo_run / "export", run / "export")
    assert main(["train", "stage1", stage1, "--run-dir", str(run)]) == 0
    args = ["--run-dir", str(run), "--set", f"data.llava_json={path}"]
    args += ["--set", f"data.image_folder={images}", "--set", "merge=true"]
    assert main(["train", "stage2", stage2, *args]) == 0
    out = run / "train" / "stage2"
    assert (out / "merged" / "config.json").exists()
    capsys.readouterr()
    question = ["--image", str(images / "1.png"), "What colour is it?"]
    assert main(["chat", "--model", str(out), *question]) == 0
    merged = capsys.readouterr().out
    shutil.rmtree(out / "merged")
    assert main(["chat", "--model", str(out), *question]) == 0
    assert capsys.readouterr().out == merged


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_gradient_checkpointing_recomputes_and_gives_the_same_training(tmp_path, stage):
    """Recomputing activations saves memory, never changes the result; in stage 1 too, where
    the frozen LLM stays in eval mode."""
    from collections import Counter

    path, images = llava_json(tmp_path)
    data = list(json_samples(path, images, Counter()))
    if stage == "stage1":
        data = [d for d in data if d[1] is not None]
    runs, calls = [], []
    for checkpointing in (False, True):
        model = tiny_model()
        count = [0]
        mlp = model.llm.model.layers[0].mlp
        # a pre-hook: a recomputation stops (early) inside the MLP, before a forward hook runs
        mlp.register_forward_pre_hook(lambda *_, c=count: c.__setitem__(0, c[0] + 1))
        cfg = stage2_config(epochs=2, gradient_checkpointing=checkpointing, stage=stage)
        runs.append(
            train(model, lambda: data, len(data), byte_tokenizer(), 32, cfg, log=lambda _: None)
        )
        calls.append(count[0])
        if stage == "stage1":  # checkpointed, yet frozen and in eval mode below the layer
            assert not model.llm.training and not mlp.training
    assert runs[1].losses == pytest.approx(runs[0].losses, rel=1e-4)
    micro_steps = 2 * -(-len(data) // 2)  # 2 epochs of per-device batches of 2
    assert calls == [micro_steps, 2 * micro_steps]  # each layer run again in the backward pass


def test_samples_that_cannot_train_are_skipped_and_counted():
    """An image cut off by max_length, a caption that says <image> itself, an answer cut off
    entirely: each skipped and counted, never a crash mid-epoch."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (36, 36), (10, 200, 30)).save(buf, "PNG")
    image = buf.getvalue()
    from condense.train.templates import IMAGE_TOKEN, encode

    tok = byte_tokenizer()
    ask = [
        {"from": "human", "value": "Look closely at this picture, please: <image>\nWhat is it?"},
        {"from": "gpt", "value": "green"},
    ]
    long = [{"from": "human", "value": "Hi " * 40}, {"from": "gpt", "value": "Hello"}]
    said = [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "an <image> tag"}]
    good = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    data = [(ask, image), (long, None), (said, image), (good, None)]
    # Long enough for `good` and both of `said`'s <image>; too short for `ask`'s image (which
    # comes after 37 more characters) and for any of `long`'s answer.
    start = encode(said, "bunny", tok, 10**6)[0].index(IMAGE_TOKEN)
    limit = start + 30
    assert len(encode(good, "bunny", tok, 10**6)[0]) <= limit
    assert encode(said, "bunny", tok, limit)[0].count(IMAGE_TOKEN) == 2
    model = tiny_model()
    cfg = stage2_config(epochs=1, max_length=limit, template="bunny")
    result = train(model, lambda: data, len(data), byte_tokenizer(), 32, cfg, log=lambda _: None)
    assert result.samples == 1
    assert result.skipped == {"image_token_mismatch": 2, "no_target": 1}


def test_json_images_are_read_when_used(tmp_path):
    """A LLaVA JSON's samples carry their image files, not the bytes (Bunny-695K would not fit
    in memory, once per worker); a file gone by the time it is used is skipped and counted."""
    from collections import Counter
    from pathlib import Path

    path, images = llava_json(tmp_path)
    data = list(json_samples(path, images, Counter()))
    assert [type(image) for _, image in data] == [type(images)] * 3 + [type(None)]
    assert all(isinstance(image, Path) for _, image in data[:3])
    (images / "1.png").unlink()
    model = tiny_model()
    cfg = stage2_config(epochs=1)
    result = train(model, lambda: data, len(data), byte_tokenizer(), 32, cfg, log=lambda _: None)
    assert result.samples == 3 and result.skipped == {"unreadable_image": 1}


def test_llava_json_entries_are_untrusted(tmp_path):
    """Entries that are not objects, turns without text, a list of images, paths that leave the
    image folder: each skipped and counted, never opened, never a crash mid-epoch."""
    from collections import Counter

    _, images = llava_json(tmp_path)
    (tmp_path / "outside.png").write_bytes((images / "0.png").read_bytes())
    good = {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}
    entries = [
        {"image": "0.png", "conversations": list(good)},
        "not an object",
        ["a", "list"],
        {"image": ["0.png", "1.png"], "conversations": list(good)},
        {"image": "../outside.png", "conversations": list(good)},
        {"image": str(tmp_path / "outside.png"), "conversations": list(good)},
        {"image": "sub/../../outside.png", "conversations": list(good)},
        {"image": "0.png\0.txt", "conversations": list(good)},
        {"image": "x" * 300 + ".png", "conversations": list(good)},  # too long a name
        {"image": "0.png", "conversations": [{"from": "human"}, good[1]]},
        {"image": "0.png", "conversations": "not a list"},
        {"image": "0.png", "conversations": [good[0], {"from": "gpt", "value": 7}]},
    ]
    (tmp_path / "bad.json").write_text(json.dumps(entries))
    skipped = Counter()
    found = list(json_samples(tmp_path / "bad.json", images, skipped))
    assert [image.name for _, image in found] == ["0.png"]
    assert skipped == {
        "bad_entry": 2,
        "bad_image_field": 1,
        "unsafe_image_path": 4,
        "unreadable_image": 1,
        "bad_turns": 3,
    }
    from condense.errors import InputError

    (tmp_path / "broken.json").write_text('[{"image": "0.png"')
    with pytest.raises(InputError, match=r"broken\.json: not a readable LLaVA JSON file"):
        list(json_samples(tmp_path / "broken.json", images, skipped))
    (tmp_path / "object.json").write_text('{"image": "0.png"}')
    with pytest.raises(InputError, match=r"object\.json: a LLaVA JSON file holds a list"):
        list(json_samples(tmp_path / "object.json", images, skipped))


def test_resume_refuses_other_settings_and_damaged_checkpoints(tmp_path):
    from collections import Counter

    from condense.errors import InputError
    from condense.train.loop import CHECKPOINT, load_projector, save_projector

    path, images = llava_json(tmp_path)
    data = list(json_samples(path, images, Counter()))
    made = {"lora": {"r": 4, "alpha": 8}, "unfreeze_vision": False, "data_files": [["d", 1, "x"]]}

    def run(settings, **kw):
        ck = Checkpointer(tmp_path / "ck", settings, kw.pop("resume", False))
        cfg = stage2_config(global_batch=1, per_device_batch=1, **kw)
        model = tiny_model()
        train(model, lambda: data, len(data), byte_tokenizer(), 32, cfg, lambda _: None, None, ck)
        return model

    model = run(made, max_steps=2)
    other = {**made, "lora": {"r": 8, "alpha": 8}, "unfreeze_vision": True}
    with pytest.raises(InputError) as info:
        run(other, resume=True)
    message = str(info.value)
    assert "was made with other settings" in message
    assert "lora {'r': 4, 'alpha': 8} (now {'r': 8, 'alpha': 8})" in message
    assert "unfreeze_vision False (now True)" in message and "data_files" not in message
    with pytest.raises(InputError, match="data_files"):
        run({**made, "data_files": [["d", 2, "y"]]}, resume=True)
    assert not list((tmp_path / "ck").glob("*.tmp")) and not list((tmp_path / "ck").glob(".*"))
    checkpoint = tmp_path / "ck" / CHECKPOINT
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # cut short
    with pytest.raises(InputError, match=rf"{CHECKPOINT}: a damaged checkpoint"):
        run(made, resume=True)
    projector = save_projector(model, tmp_path / "out")
    projector.write_bytes(projector.read_bytes()[:100])
    with pytest.raises(InputError, match=r"mm_projector\.safetensors: not a readable safetensors"):
        load_projector(tiny_model(), projector)


def test_chat_and_training_refuse_extreme_aspect_images_before_resizing(tmp_path):
    from collections import Counter

    from condense.errors import InputError
    from condense.train.chat import answer
    from condense.train.config import TrainConfig
    from condense.train.data import load_image

    buf = io.BytesIO()
    Image.new("L", (1, 200_000)).save(buf, format="PNG")
    skipped = Counter()
    assert load_image(buf.getvalue(), 32, skipped) is None and skipped == {"extreme_aspect": 1}
    model = tiny_model()
    with pytest.raises(InputError, match=r"the image cannot be used \(extreme_aspect\)"):
        answer(model, byte_tokenizer(), TrainConfig(), buf.getvalue(), "What is it?")


@pytest.mark.slow  # inductor compiles C++ kernels on the CPU: about two minutes
def test_compiled_layers_train_as_the_eager_ones(tmp_path):
    """train.compile: torch.compile on each decoder layer (with its LoRA adapters) and the
    vision tower gives the eager losses within float tolerance, and weights within what
    AdamW's normalised steps make of float noise in a near-zero gradient (a few steps at lr
    1e-2), under the same parameter names (checkpoints do not change)."""
    from collections import Counter

    from condense.train.data import json_samples
    from condense.train.loop import train
    from condense.train.model import decoder_layers
    from condense.train.tokenizers import byte_tokenizer

    path, images = llava_json(tmp_path)
    data = list(json_samples(path, images, Counter()))
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = tiny_model()
        cfg = stage2_config(epochs=2, compile=compiled)
        result = train(
            model, lambda: data, len(data), byte_tokenizer(), 32, cfg, log=lambda _: None
        )
        runs[compiled] = (result.losses, model.state_dict())
        layers = [*decoder_layers(model.llm), model.vision]
        assert all((m._compiled_call_impl is not None) == compiled for m in layers)
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    assert list(runs[True][1]) == list(runs[False][1])
    for k, v in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][k], v, rtol=1e-3, atol=1e-3)


def test_loader_workers_give_the_same_batches_and_counts(tmp_path, monkeypatch):
    """train.loader_workers: samples decoded and tokenised in worker processes come back in
    the stream's order with their skip counts: the same losses, bit for bit, and counts."""
    from collections import Counter
    from concurrent.futures import Future

    from condense.train import loop
    from condense.train.data import json_samples
    from condense.train.loop import train
    from condense.train.tokenizers import byte_tokenizer

    taken = Counter()  # what the loop takes: samples to prepare here, or the pool's futures
    take = loop.Loader.take

    def counting_take(self, sample):
        taken["future" if isinstance(sample, Future) else "here"] += 1
        return take(self, sample)

    monkeypatch.setattr(loop.Loader, "take", counting_take)

    path, images = llava_json(tmp_path)
    data = list(json_samples(path, images, Counter()))
    turns = [{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "x"}]
    data += [(turns, b"not an image")]  # skipped by the decoder, in whichever process
    runs = {}
    for workers in (0, 2):
        model = tiny_model()
        cfg = stage2_config(epochs=2, loader_workers=workers)
        runs[workers] = train(
            model, lambda: data, len(data), byte_tokenizer(), 32, cfg, log=lambda _: None
        )
    assert runs[2].losses == runs[0].losses and runs[2].steps == runs[0].steps
    assert runs[2].skipped == runs[0].skipped and runs[0].skipped["corrupt_image"] == 2
    assert taken["here"] == taken["future"] == 2 * len(data)  # each run's two epochs
