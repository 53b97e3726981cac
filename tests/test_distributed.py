"""Training on two processes (core.distributed) on the CPU with gloo: the same adapter as one process with the
doubled batch, for a UNet family and a transformer family; a stop requested mid-run stops both workers with one
final save; a resume from a two-process state continues to the weights of an uninterrupted two-process run.

``core.train`` is called here, in the test process, and spawns its two workers itself: each worker is a fresh
Python process.  The one-process references run in the test process (the ordinary path)."""
from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import core
from tests.tiny_models import build_tiny_dataset, build_tiny_sd15, tiny_train_settings
from tests.tiny_models_dit import build_tiny_dit, settings_paths

# three images in one bucket: a global batch of 2 leaves a last batch of one row, where worker 1 has none
SD15 = dict(schedule__max_train_steps=6, saving__save_precision="float", saving__save_every_n_steps=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    build_tiny_dataset(root / "data", n=3)
    return {"sd15": build_tiny_sd15(root / "sd15"), "data": root / "data", "root": root}


def sd15_settings(tiny, out, processes, batch, **overrides):
    return tiny_train_settings("sd15", {"model.model_path": str(tiny["sd15"])}, tiny["data"], tiny["root"] / out,
                               distributed__num_processes=processes, schedule__train_batch_size=batch,
                               **{**SD15, **overrides})


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_trained(adapter: dict) -> None:
    """The comparison means something: the up matrices (zero at the start) moved."""
    assert max(v.abs().max().item() for k, v in adapter.items() if k.endswith("lora_up.weight")) > 1e-3


@pytest.fixture(scope="module")
def two_processes(tiny):
    """An uninterrupted two-process run (batch 1 each), 6 steps, with a save at step 3."""
    s, config = sd15_settings(tiny, "two", 2, 1)
    events = []
    t0 = time.time()
    result = core.train(s, on_event=events.append, config=config)
    return {"result": result, "events": events, "wall": time.time() - t0}


def test_two_processes_train_the_adapter_of_one_with_the_doubled_batch(tiny, two_processes):
    s, config = sd15_settings(tiny, "one", 1, 2, schedule__max_train_steps=3, saving__save_every_n_steps=0)
    events = []
    t0 = time.time()
    one = core.train(s, on_event=events.append, config=config)
    wall_one = time.time() - t0
    # the first epoch has a batch of one row: worker 1 then runs without rows of its own
    from core import dataset as ds_mod
    items = ds_mod.scan_dataset(s.dataset, tiny["data"])
    ds_mod.assign_buckets(items, s.dataset)
    assert sorted(map(len, ds_mod.BucketBatchSampler(items, 2, s.schedule.seed).batches(0))) == [1, 2]
    two = two_processes["result"]
    at_3 = two.final.with_name("tiny_sd15-step000003.safetensors")
    a, b = load_file(str(one.final)), load_file(str(at_3))
    assert_trained(a)
    diff = max_diff(a, b)
    print(f"SD1.5 2 processes x batch 1 vs 1 process x batch 2, 3 steps: max |diff| {diff:.2e}; "
          f"wall {two_processes['wall']:.1f} s (6 steps, 2 saves) vs {wall_one:.1f} s")
    assert diff <= 1e-5
    # rank 0's events reached the caller: every step's loss, summed over both workers
    losses_one = [e["loss"] for e in events if e["type"] == "progress"]
    losses_two = [e["loss"] for e in two_processes["events"] if e["type"] == "progress"]
    assert len(losses_two) == 6
    torch.testing.assert_close(torch.tensor(losses_two[:3]), torch.tensor(losses_one), rtol=1e-5, atol=1e-6)
    assert [e["type"] for e in two_processes["events"]][-2:] == ["done", "status"]
    plan = next(e for e in two_processes["events"] if e["type"] == "plan")["summary"]
    assert "2 processes (DDP) with a global batch of 2" in plan
    assert not multiprocessing.active_children()


def test_flux_two_processes_equal_one_with_the_doubled_batch(tmp_path):
    paths = build_tiny_dit("flux1_dev", tmp_path / "flux1_dev", "diffusers")
    # 6 images, 2 held out for the validation loss (one per worker), 4 trained on
    build_tiny_dataset(tmp_path / "data", n=6)

    def run(out, processes, batch, **overrides):
        # the disk caches: rank 0 of the first run writes them and worker 1 reads them; the second run reads them
        s, config = tiny_train_settings(
            "flux1_dev", {**settings_paths(paths), "model.t5_max_length": 24}, tmp_path / "data", tmp_path / out,
            schedule__timestep_sampling="flux_shift", model__guidance=3.5, schedule__max_train_steps=3,
            schedule__train_batch_size=batch, distributed__num_processes=processes, saving__save_precision="float",
            dataset__cache_latents="disk", dataset__validation_split=0.34, schedule__validate_every_n_steps=3,
            **overrides)
        t0 = time.time()
        result = core.train(s, config=config)
        return result, load_file(str(result.final)), time.time() - t0

    # rank 0 renders a preview alone, in random streams of its own: the training streams stay the others'
    result, two, wall_two = run("two", 2, 1, sampling__sample_every_n_steps=2, sampling__prompts="a blue circle")
    assert [p.name for p in result.samples] == ["tiny_flux1_dev-step000002-0.png"]
    assert [p.name for p in (result.final.parent / "samples").iterdir()] == ["tiny_flux1_dev-step000002-0.png"]
    single, one, wall_one = run("one", 1, 2)
    assert_trained(one)
    # each worker measured one held-out image; their sums add up to the one process's measurement of both
    assert [st for st, _ in result.validation] == [st for st, _ in single.validation] == [3]
    assert abs(result.validation[0][1] - single.validation[0][1]) <= 1e-5 * abs(single.validation[0][1])
    diff = max_diff(one, two)
    print(f"FLUX.1 dev 2 processes x batch 1 vs 1 process x batch 2, 3 steps: max |diff| {diff:.2e}; "
          f"wall {wall_two:.1f} s vs {wall_one:.1f} s")
    assert diff <= 1e-5


@pytest.fixture(scope="module")
def stopped(tiny):
    """A two-process run of the same settings, stopped after its first reported step."""
    s, config = sd15_settings(tiny, "split", 2, 1, saving__save_every_n_steps=0)
    stop = threading.Event()
    events = []

    def on_event(event):
        events.append(event)
        if event["type"] == "progress" and event["step"] == 1:
            stop.set()
    result = core.train(s, on_event=on_event, stop_event=stop, config=config)
    folder = result.final.parent
    return {"result": result, "events": events, "settings": s, "config": config,
            "files": sorted(p.name for p in folder.iterdir()), "logs": list((folder / "logs").iterdir())}


def test_stop_mid_run_stops_both_workers_with_one_final_save(stopped):
    result, events = stopped["result"], stopped["events"]
    assert result.stopped and 1 <= result.steps < 6
    folder = result.final.parent
    assert result.final == folder / "tiny_sd15.safetensors"
    assert result.state_dir == folder / f"tiny_sd15-state-{result.steps:06d}"
    # one save, written once (by rank 0): one adapter, one state, one log folder (listed before the resume)
    assert stopped["files"] == ["logs", result.state_dir.name, "tiny_sd15.safetensors"]
    assert len(stopped["logs"]) == 1
    saved = [(e["kind"], e["step"]) for e in events if e["type"] == "saved"]
    assert saved == [("adapter", result.steps), ("state", result.steps)]
    # both workers returned on their own (none had to be ended after rank 0)
    assert not [e for e in events if e["type"] == "log" and e["level"] == "warning"]
    assert [e["stopped"] for e in events if e["type"] == "done"] == [True]
    assert not multiprocessing.active_children()


def test_resume_on_two_processes_continues_to_the_uninterrupted_weights(stopped, two_processes):
    s, config = stopped["settings"], stopped["config"]
    s.saving.resume_from = str(stopped["result"].state_dir)
    events = []
    resumed = core.train(s, on_event=events.append, config=config)
    steps = [e["step"] for e in events if e["type"] == "progress"]
    assert steps == list(range(stopped["result"].steps + 1, 7)) and resumed.steps == 6
    a, b = load_file(str(two_processes["result"].final)), load_file(str(resumed.final))
    assert_trained(a)
    diff = max_diff(a, b)
    print(f"2-process resume from step {stopped['result'].steps} vs uninterrupted: max |diff| {diff:.2e}")
    assert diff <= 1e-6


def test_what_cannot_be_split_exactly_is_refused_before_any_worker_starts(tiny):
    from core.distributed import process_count
    s, config = sd15_settings(tiny, "refused", 2, 1, network__dropout=0.1, network__rank_dropout=0.1)
    with pytest.raises(core.SettingsError) as refused:
        core.train(s, config=config)
    assert "network.dropout (0.1) draws a mask per sample" in str(refused.value)
    assert "network.rank_dropout (0.1)" in str(refused.value)
    assert not multiprocessing.active_children()
    s.distributed.num_processes = 1
    assert not [p for p in core.settings.check_consistency(s) if "per sample" in p]
    # 0: one process per GPU; more processes than GPUs cannot each have their own
    s.distributed.num_processes = 0
    assert (process_count(s, cuda_gpus=0), process_count(s, cuda_gpus=4)) == (1, 4)
    s.distributed.num_processes = 3
    assert process_count(s, cuda_gpus=0) == 3
    with pytest.raises(core.SettingsError, match="distributed.num_processes is 3, but this machine has 2"):
        process_count(s, cuda_gpus=2)


def test_a_share_of_flux3_conditioning_keeps_the_whole_batch_text_window():
    """FLUX.3 cuts the batch's prompt embeddings to its widest caption: a worker's rows keep the whole batch's
    window (a share's own widest caption may be narrower), as one process gives them to the model."""
    import architectures
    arch = architectures.get("flux3_klein")
    embeds = torch.randn(3, 8, 4)
    cond = {"prompt_embeds": embeds, "text_window": torch.tensor([2, 6, 3])}
    share = arch.conditioning_rows(None, cond, 2, 3)
    assert torch.equal(arch.windowed(share), embeds[2:3, :6])
    assert torch.equal(arch.windowed(arch.conditioning_rows(None, cond, 0, 3)), arch.windowed(cond))
    # families whose model reads nothing across the batch cut every entry
    flux1 = architectures.get("flux1_dev")
    cond = {"prompt_embeds": embeds, "pooled": torch.randn(3, 5), "t5_mask": torch.ones(3, 8)}
    assert {k: v.shape[0] for k, v in flux1.conditioning_rows(None, cond, 1, 3).items()} == dict.fromkeys(cond, 2)


def test_gradient_buckets_keep_order_dtype_and_cap():
    from core.distributed import gradient_buckets
    t = [torch.zeros(10), torch.zeros(10), torch.zeros(30), torch.zeros(4, dtype=torch.float64), torch.zeros(5)]
    buckets = gradient_buckets(t, cap_bytes=100)   # 40 + 40 bytes fit; 120 bytes alone; a dtype change cuts
    assert [[x.numel() for x in b] for b in buckets] == [[10, 10], [30], [4], [5]]
    assert [x for b in buckets for x in b] == t


def _sum_in_buckets(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    import core.distributed as cd
    from core.trainer import StepLosses
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    g = torch.Generator().manual_seed(rank)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (7, 300, 5, 2000)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    losses = StepLosses(torch.device("cpu"), 1)
    losses.add(torch.tensor(float(rank + 1)))
    cd.BUCKET_BYTES = 1300   # several buckets, one of them a single tensor larger than the cap
    cd.Peers(rank, 2, store, torch.device("cpu")).sum_gradients(params, losses)
    torch.save({"grads": [p.grad for p in params], "loss": float(losses.current)}, out)
    dist.destroy_process_group()


def test_two_processes_sum_every_gradient_through_bounded_buckets(tmp_path):
    """Peers.sum_gradients on two real gloo processes with a cap far below the gradients' size: every gradient
    (and the step's loss) is the sum of both workers', whatever bucket it travelled in."""
    import torch.distributed as dist
    ctx = multiprocessing.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False)
    outs = [str(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    workers = [ctx.Process(target=_sum_in_buckets, args=(r, store.port, outs[r])) for r in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    sizes = (7, 300, 5, 2000)
    draws = {r: [torch.randn(n, generator=g) for g in [torch.Generator().manual_seed(r)] for n in sizes]
             for r in (0, 1)}
    for out in outs:
        got = torch.load(out)
        for i in range(len(sizes)):
            torch.testing.assert_close(got["grads"][i], draws[0][i] + draws[1][i], rtol=0, atol=1e-6)
        assert got["loss"] == 3.0


# -- FSDP: a full fine-tune sharded over the workers (core.fsdp) -------------------------------------------------

@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """A tiny FLUX.1 full fine-tune of 3 steps on two processes with FSDP (batch 1 each), stopped after its first
    reported step and resumed from the state the stop saved; and the same on one process with the doubled batch,
    saving every step.  6 images, 3 held out for the validation loss: one worker measures two, the other one and a
    repeat at weight 0."""
    root = tmp_path_factory.mktemp("fsdp")
    paths = build_tiny_dit("flux1_dev", root / "flux1_dev", "diffusers")
    build_tiny_dataset(root / "data", n=6)

    def run(out, processes, batch, stop=None, **overrides):
        s, config = tiny_train_settings(
            "flux1_dev", {**settings_paths(paths), "model.t5_max_length": 24}, root / "data", root / out,
            network__algorithm="full_finetune", schedule__timestep_sampling="flux_shift", model__guidance=3.5,
            schedule__max_train_steps=3, schedule__train_batch_size=batch, distributed__num_processes=processes,
            saving__save_precision="float", dataset__validation_split=0.5, schedule__validate_every_n_steps=3,
            optimizer__max_grad_norm=0.05, memory__gradient_checkpointing="off", **overrides)
        events = []

        def on_event(event):
            events.append(event)
            if stop is not None and event["type"] == "progress" and event["step"] == 1:
                stop.set()
        t0 = time.time()
        result = core.train(s, on_event=on_event, stop_event=stop, config=config)
        return {"result": result, "events": events, "wall": time.time() - t0, "settings": s}

    fsdp = dict(distributed__strategy="fsdp")
    stopped = run("two", 2, 1, stop=threading.Event(), **fsdp)
    resumed = run("two", 2, 1, saving__resume_from=str(stopped["result"].state_dir),
                  sampling__sample_every_n_steps=3, sampling__prompts="a blue circle", **fsdp)
    one = run("one", 1, 2, saving__save_every_n_steps=1)
    return {"stopped": stopped, "resumed": resumed, "one": one}


def test_fsdp_two_processes_train_the_checkpoint_of_one_with_the_doubled_batch_across_a_stop(fsdp_runs):
    stopped, resumed, one = fsdp_runs["stopped"], fsdp_runs["resumed"], fsdp_runs["one"]
    k = stopped["result"].steps
    assert stopped["result"].stopped and 1 <= k < 3
    # the stop saved once, written by rank 0: the checkpoint and its state
    assert [(e["kind"], e["step"]) for e in stopped["events"] if e["type"] == "saved"] == [("checkpoint", k),
                                                                                          ("state", k)]
    assert [e["step"] for e in resumed["events"] if e["type"] == "progress"] == list(range(k + 1, 4))
    # rank 0 alone read the fp32 denoiser (at the start and from the state): the other worker got its shards
    assert any("only this process read the denoiser, the others received their shards" in e.get("message", "")
               for e in stopped["events"] if e["type"] == "log")
    single = one["result"].final   # its last step; each earlier one saved beside it
    for step, two in ((k, stopped["result"].final), (3, resumed["result"].final)):
        a = load_file(str(single if step == 3 else single.with_name(f"tiny_flux1_dev-step{step:06d}.safetensors")))
        b = load_file(str(two))
        # a full fine-tune's file holds every weight: each is finite
        assert all(torch.isfinite(v).all() for v in b.values())
        diff = max_diff(a, b)
        print(f"FLUX.1 full fine-tune FSDP 2 processes x batch 1 (stopped at {k}, resumed) vs 1 process x batch 2, "
              f"step {step}: max |diff| {diff:.2e}")
        assert diff <= 1e-5
    print(f"wall: FSDP {stopped['wall']:.1f} s + {resumed['wall']:.1f} s (resumed), one process {one['wall']:.1f} s")
    # the resumed steps moved the weights (a lost optimizer state would not match one process's to 1e-5)
    assert max_diff(load_file(str(stopped["result"].final)), load_file(str(resumed["result"].final))) > 1e-4
    losses = lambda run: [e["loss"] for e in run["events"] if e["type"] == "progress"]
    torch.testing.assert_close(torch.tensor(losses(stopped) + losses(resumed)), torch.tensor(losses(one)),
                               rtol=1e-5, atol=1e-6)
    # the validation loss of 3 held-out images split 2 + 1 (+ 1 at weight 0) equals one process's
    (step_two, val_two), = resumed["result"].validation
    (step_one, val_one), = one["result"].validation
    assert step_two == step_one == 3 and abs(val_two - val_one) <= 1e-5 * abs(val_one)
    # every worker rendered the preview (the sharded forward is a collective); rank 0 wrote it once
    assert [p.name for p in resumed["result"].samples] == ["tiny_flux1_dev-step000003-0.png"]
    plan = next(e for e in stopped["events"] if e["type"] == "plan")["summary"]
    assert "2 processes (FSDP)" in plan and "sharded: 1/2 each" in plan
    assert not multiprocessing.active_children()


def test_fsdp_states_resume_only_with_their_strategy_and_process_count(fsdp_runs):
    """The state records its strategy and process count: another count, or DDP, is refused before loading."""
    from core.trainer import check_resume
    s = fsdp_runs["resumed"]["settings"].model_copy(deep=True)
    state = Path(s.saving.resume_from)
    assert check_resume(state, s, 2)["processes"] == 2
    with pytest.raises(core.SettingsError, match="trained on 2 processes; this run has 3"):
        check_resume(state, s, 3)
    s.distributed.strategy = "ddp"
    with pytest.raises(core.SettingsError, match="trained with distributed.strategy fsdp"):
        check_resume(state, s, 2)
    # a DDP state's position counts global batches too: only its own process count continues it; a state from
    # before the count was recorded continues on any
    from core.fsdp import resume_problems
    assert resume_problems({"strategy": "ddp", "processes": 2}, s, 2) == []
    assert "trained on 2 processes; this run has 1" in resume_problems({"strategy": "ddp", "processes": 2}, s, 1)[0]
    assert resume_problems({"strategy": "ddp"}, s, 3) == []


def test_fsdp_is_refused_where_it_cannot_shard(tiny):
    """FSDP shards a full fine-tune over several processes: adapters (DDP is right for them), one process, EMA,
    block swapping and fp16 are refused with the setting to change."""
    from core.distributed import distributed_problems, process_count
    s, _ = sd15_settings(tiny, "fsdp_refused", 2, 1, distributed__strategy="fsdp")
    problems = core.settings.check_consistency(s)
    assert any("network.algorithm is lora" in p and "choose DDP (Distributed → Strategy)" in p for p in problems)
    s.network.algorithm = "full_finetune"
    assert not [p for p in core.settings.check_consistency(s) if "strategy" in p]
    s.distributed.num_processes = 1
    assert any("this run has one" in p for p in core.settings.check_consistency(s))
    s.distributed.num_processes = 0   # one per GPU: refused where that is one process
    with pytest.raises(core.SettingsError, match="gives one process here"):
        process_count(s, cuda_gpus=1)
    assert process_count(s, cuda_gpus=4) == 4
    s.network.ema, s.memory.blocks_to_swap, s.memory.mixed_precision = True, 4, "fp16"
    problems = distributed_problems(s, 2)
    assert [p.split(" ", 1)[0] for p in problems] == ["network.ema", "memory.blocks_to_swap",
                                                      "memory.mixed_precision"]
    s.network.ema, s.memory.blocks_to_swap, s.memory.mixed_precision = False, 0, "no"
    for optimizer in ("Adafactor", "CAME"):   # their factored statistics cannot be sharded
        s.optimizer.optimizer_type = optimizer
        assert [p.split(" ", 2)[:2] for p in distributed_problems(s, 2)] == [["optimizer.optimizer_type", optimizer]]
    s.distributed.strategy = "ddp"
    assert not distributed_problems(s, 2)


def test_validation_shares_keep_every_worker_at_the_same_count():
    """A sharded model's forward pass is a collective: with ``same_count`` the short workers repeat the last
    item at weight 0, so every worker runs as many and the weights still count each item once."""
    from core.distributed import SOLO, Peers
    items = list("abc")
    shares = [Peers(r, 2, None, torch.device("cpu")).share_of(items, same_count=True) for r in (0, 1)]
    assert shares == [[("a", 1.0), ("c", 1.0)], [("b", 1.0), ("c", 0.0)]]
    assert Peers(1, 2, None, torch.device("cpu")).share_of(items) == [("b", 1.0)]
    assert [len(Peers(r, 4, None, torch.device("cpu")).share_of(items, True)) for r in range(4)] == [1] * 4
    assert SOLO.share_of(items, True) == [(i, 1.0) for i in items]
