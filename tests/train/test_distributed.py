"""Several workers train as one: the block schedule, and Ray Train workers (DDP, FSDP) against
one process with the same global batch."""

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from condense.train.loop import _micro_batches
from tests.conftest import REPO


def schedule(n, span, size, world, unusable=(), blocks=None):
    """Each worker's micro-batches (lists of sample numbers; None: an empty pass) and ends;
    `blocks` collects each micro-batch's count of blocks in its step."""
    out = []
    for rank in range(world):
        worker = SimpleNamespace(rank=rank, world=world)
        got = _micro_batches(
            range(n), 0, span, size, worker, lambda i: None if i in unusable else i
        )
        triples = list(got)
        if blocks is not None:
            blocks.append([c for _, e, c in triples if e is not None])  # per step
        out.append([(b, e) for b, e, _ in triples])
    return out


def test_blocks_go_round_robin_and_every_worker_joins_every_step():
    # 11 samples, steps of 4, blocks of 1, two workers: steps {0..3}, {4..7}, {8..10}.
    w0, w1 = schedule(11, 4, 1, 2)
    assert w0 == [([0], None), ([2], 5 - 1), ([4], None), ([6], 8), ([8], None), ([10], 0)]
    # The last step has 3 samples: worker 1 gets one block and then an empty pass.
    assert w1 == [([1], None), ([3], 4), ([5], None), ([7], 8), ([9], None), (None, 0)]
    counts = []
    schedule(11, 4, 1, 2, blocks=counts)  # the last step has 3 blocks: its mean is over 3
    assert counts == [[4, 4, 3]] * 2
    (one,) = schedule(11, 4, 1, 1)
    assert [b for b, _ in one] == [[i] for i in range(11)]
    assert [e for _, e in one if e is not None] == [4, 8, 0]
    # Blocks of 2 within steps of 8 on two workers; an unusable sample shortens its block.
    w0, w1 = schedule(8, 8, 2, 2, unusable={5})
    assert w0 == [([0, 1], None), ([4], 0)] and w1 == [([2, 3], None), ([6, 7], 0)]
    # Fewer samples than workers: the second worker only passes.
    assert schedule(1, 4, 1, 2) == [[([0], 0)], [(None, 0)]]


def test_resuming_skips_whole_steps():
    worker = SimpleNamespace(rank=1, world=2)
    got = list(_micro_batches(range(10), 4, 4, 1, worker, lambda i: i))
    assert [(b, e) for b, e, _ in got] == [([5], None), ([7], 8), ([9], 0)]
    assert got[-1][2] == 2  # the last step: samples 8 and 9


def caption_json(folder, n):
    (folder / "images").mkdir(parents=True)
    entries = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (36, 36), (25 * i % 255, 90, 200 - 10 * i)).save(buf, "PNG")
        (folder / "images" / f"{i}.png").write_bytes(buf.getvalue())
        turns = [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": f"hue {i}"}]
        entries.append({"id": str(i), "image": f"{i}.png", "conversations": turns})
    entries.append(
        {
            "id": "t",
            "conversations": [  # text only: stage 2 trains on it
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
            ],
        }
    )
    (folder / "data.json").write_text(json.dumps(entries))
    return folder / "data.json"


def run_stage(stage, run_dir, data, workers, strategy="ddp", **settings):
    from condense.config import load_config
    from condense.train.config import TrainConfig
    from condense.train.run import train_stage

    overrides = [f"data.llava_json={data}", f"data.image_folder={data.parent / 'images'}"]
    overrides += [f"workers={workers}", f"strategy={strategy}"]
    overrides += ["cpus_per_worker=0.5", "global_batch=4", "per_device_batch=1", "epochs=2"]
    overrides += [f"{k}={v}" for k, v in settings.items()]
    cfg = load_config(
        REPO / "configs" / "train" / f"{stage}-tiny.yaml",
        [*overrides, f"stage={stage}"],
        model=TrainConfig,
    )
    state = train_stage(cfg, run_dir, log=lambda _: None)
    from safetensors.torch import load_file

    projector = load_file(str(run_dir / "train" / stage / "mm_projector.safetensors"))
    return state, projector


def assert_same_training(one, two):
    """Two workers' (state, projector) of a stage against one process's."""
    (state1, proj1), (state2, proj2) = one, two
    assert state2["workers"] == 2 and state1["workers"] == 1
    assert state1["steps"] == state2["steps"] == 6  # 2 epochs of ceil(10 / 4) steps
    assert state1["samples"] == state2["samples"]
    assert state1["tokens"] == state2["tokens"]
    assert state1["losses"] == pytest.approx(state2["losses"], rel=1e-4)
    for k in proj1:
        torch.testing.assert_close(proj1[k], proj2[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_ddp_workers_match_one_and_recover_from_a_killed_worker(
    ray_session, tmp_path, failpoints
):
    """Stage 1 then stage 2 (LoRA, a text-only sample, a short last step) on two Ray Train DDP
    workers give the losses and weights of one process with the same global batch. Worker 1 is
    SIGKILLed after step 5 of stage 1: Ray Train restarts both workers, which go on from the
    checkpoint of step 4 and end where the uninterrupted process ended."""
    data = caption_json(tmp_path, 9)
    marks = failpoints("train_kill:1-5")
    results = {}
    for workers in (1, 2):
        run = tmp_path / f"run{workers}"
        one = run_stage("stage1", run, data, workers, "ddp", save_every=2)
        two = run_stage("stage2", run, data, workers, "ddp", **{"lora.dropout": 0.0})
        results[workers] = (one, two)
    assert sorted(p.name for p in marks.iterdir()) == ["spec", "train_kill-1-5"]
    assert results[2][0][0]["resumed_at_step"] == 4  # went on from step 4, mid-epoch 2
    assert results[1][0][0]["resumed_at_step"] is None
    for one, two in zip(results[1], results[2], strict=True):
        assert_same_training(one, two)
    assert results[2][0][0]["skipped"] == {"no_image": 2}  # the text-only sample, per epoch


@pytest.mark.slow
def test_two_fsdp_workers_match_one_in_stage2(ray_session, tmp_path):
    """Stage 2 (LoRA, a text-only sample, a short last step) on two FSDP workers, sharding
    weights, gradients and optimizer state, gives one process's losses and weights; both start
    from the same stage-1 projector (stage 1 under FSDP trains a subset of those parameters)."""
    data = caption_json(tmp_path, 9)
    run_stage("stage1", tmp_path / "run1", data, 1, "fsdp")
    start = tmp_path / "run1" / "train" / "stage1" / "mm_projector.safetensors"
    settings = {"lora.dropout": 0.0, "projector_from": start}
    one = run_stage("stage2", tmp_path / "run1", data, 1, "fsdp", **settings)
    two = run_stage("stage2", tmp_path / "run2", data, 2, "fsdp", **settings)
    assert_same_training(one, two)


@pytest.mark.slow
def test_a_workers_error_reaches_the_command_line(ray_session, tmp_path, capsys, monkeypatch):
    """An input problem found inside the Ray Train workers is reported like one found here;
    relative paths given here mean the same in the workers (which run in folders of their own)."""
    from condense.cli import main

    caption_json(tmp_path, 2)
    for image in (tmp_path / "images").iterdir():
        image.unlink()  # every sample's image is missing: nothing can be trained on
    monkeypatch.chdir(tmp_path)
    args = ["train", "stage1", str(REPO / "configs" / "train" / "stage1-tiny.yaml")]
    args += ["--run-dir", "run", "--workers", "2", "--set", "cpus_per_worker=0.5"]
    args += ["--set", "data.llava_json=data.json", "--set", "data.image_folder=images"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no sample could be used (missing_image=2" in err


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_one_process_checkpoint_resumes_under_ddp_and_fsdp(tmp_path, strategy):
    """Checkpoints name every tensor (weights, optimizer state), whatever wrote them: a run
    checkpointed by one plain process resumes in a process group (here of one, on gloo) under
    DDP or FSDP and ends where the uninterrupted run ends."""
    from collections import Counter

    import torch.distributed as dist

    from condense.train.data import json_samples
    from condense.train.loop import train
    from condense.train.parallel import make_parallel
    from condense.train.tokenizers import byte_tokenizer
    from tests.test_jobs import free_ports
    from tests.train.test_stage1 import tiny_model
    from tests.train.test_stage2 import llava_json, stage2_config

    path, images = llava_json(tmp_path)
    data = list(json_samples(path, images, Counter()))

    def run(checkpoints, parallel=None, **kw):
        from condense.train.loop import Checkpointer

        model = tiny_model()
        ck = Checkpointer(checkpoints, resume=kw.pop("resume", False))
        cfg = stage2_config(global_batch=2, per_device_batch=1, epochs=2, **kw)
        result = train(
            model, lambda: data, len(data), byte_tokenizer(), 32, cfg, lambda _: None, parallel, ck
        )
        return result, model.projector.state_dict()

    whole, want = run(tmp_path / "a")
    run(tmp_path / "b", max_steps=2)
    (port,) = free_ports(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        resumed, got = run(tmp_path / "b", make_parallel(strategy), resume=True)
        got = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in got.items()}
    finally:
        dist.destroy_process_group()
    assert resumed.steps == whole.steps == 4
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-5)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_a_step_without_images_leaves_the_projector_alone_under_fsdp(tmp_path):
    """FSDP runs the projector on a blank image at weight 0 in a batch without images; its zero
    gradient must not become an AdamW momentum step that one process would not take."""
    from collections import Counter

    import torch.distributed as dist

    from condense.train.data import json_samples
    from condense.train.loop import train
    from condense.train.parallel import make_parallel
    from condense.train.tokenizers import byte_tokenizer
    from tests.test_jobs import free_ports
    from tests.train.test_stage1 import tiny_model
    from tests.train.test_stage2 import llava_json, stage2_config

    path, images = llava_json(tmp_path)
    data = list(json_samples(path, images, Counter()))  # 3 with images, then a text-only one
    data = data[:2] + [data[3], data[3]]  # step 1: two images; step 2: text only

    def run(parallel=None):
        model = tiny_model()
        cfg = stage2_config(global_batch=2, per_device_batch=1, epochs=1, warmup_ratio=0.0)
        train(model, lambda: data, 4, byte_tokenizer(), 32, cfg, lambda _: None, parallel)
        state = model.projector.state_dict()
        return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}

    want = run()
    (port,) = free_ports(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        got = run(make_parallel("fsdp"))
    finally:
        dist.destroy_process_group()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_each_worker_reads_only_the_images_of_its_share(tmp_path, monkeypatch):
    """Shards streamed by N workers: each sees the whole stream in the same order (so the
    block schedule is the one of a single reader), but only its own blocks' images are read;
    the others' are seeked over. Between them the workers read the images once, not N times."""
    import tarfile
    from collections import Counter
    from functools import partial

    import condense.readers.shards as shards_module
    from condense.train.data import shard_samples
    from condense.train.loop import _is_mine

    rng = np.random.default_rng(0)
    shards, images = [], {}
    for s in range(3):
        path = tmp_path / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(40):
                key = f"{s}{i:03d}"
                size = 100_000 if i % 5 else 3_000  # most seeked over, a few small ones read
                images[key] = rng.bytes(size)
                for ext, data in (("jpg", images[key]), ("txt", f"caption {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    read = Counter()
    opener = shards_module._fsspec_open

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, size=-1):
            data = self.f.read(size)
            read["bytes"] += len(data)
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(shards_module, "_fsspec_open", lambda *a: Counting(opener(*a)))
    full = list(shard_samples(shards, Counter()))
    whole = read["bytes"]
    assert len(full) == 120 and whole > sum(map(len, images.values()))
    for world in (2, 4):
        total = 0
        for rank in range(world):
            read.clear()
            share = partial(_is_mine, 0, 16, 2, rank, world)
            got = list(shard_samples(shards, Counter(), wanted=share))
            assert [turns for turns, _ in got] == [turns for turns, _ in full]
            for position, ((_, image), (_, want)) in enumerate(zip(got, full, strict=True)):
                assert image == (want if share(position) else None)
            total += read["bytes"]
        # The images once between them, plus each worker's pass over every header (two small
        # read-aheads per sample it does not use).
        headers = world * len(full) * 2 * shards_module.SPARSE_CHUNK
        assert total < whole + headers and total < whole * (1.2 if world == 2 else 1.45)
    schedule = [
        [
            b
            for b, _e, _c in _micro_batches(
                range(120), 0, 16, 2, SimpleNamespace(rank=r, world=2), lambda i: i
            )
        ]
        for r in range(2)
    ]
    share0 = partial(_is_mine, 0, 16, 2, 0, 2)
    assert [i for b in schedule[0] if b for i in b] == [p for p in range(120) if share0(p)]


def test_the_loader_keeps_its_own_samples_in_flight_whatever_the_worker():
    """loader_workers with several training workers: the stream runs ahead until `depth` of
    this worker's own samples are being prepared, however many of the others' lie between."""
    from functools import partial

    from condense.train.loop import Loader, _is_mine

    class Pool:  # records what is submitted, and hands the sample back as its "future"
        def __init__(self):
            self.submitted = []

        def submit(self, fn, sample):
            self.submitted.append(sample)
            return sample

    for rank in range(4):
        loader = Loader.__new__(Loader)  # its pool replaced by the recording one
        loader.pool, loader.depth = Pool(), 6
        submitted = loader.pool.submitted
        share = partial(_is_mine, 0, 64, 2, rank, 4)
        out = loader.ahead(iter(range(1000)), share)
        first = next(item for item in out if item is not None)
        assert first == submitted[0] and len(submitted) == 7  # itself and 6 more in flight
        rest = [item for item in out if item is not None]
        assert [first, *rest] == [p for p in range(1000) if share(p)]
