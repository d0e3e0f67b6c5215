"""Process-group plumbing on CPU with gloo: the test helper, collectives, sharded checkpoints of a
toy module across world sizes, and a dead rank stopping its peers within a bounded time."""

from __future__ import annotations

import datetime
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moesaic.errors import CheckpointError
from moesaic.train import dist_checkpoint as dcp_ckpt
from moesaic.train import distributed as D
from moesaic.train.watchdog import Watchdog
from tests.dist_utils import run_distributed, start_workers

# ------------------------------------------------------------------------------- the helper


def _fail_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank one")
    dist.barrier()  # rank 0 would wait here forever without the helper stopping it


def test_helper_reports_a_rank_failure_with_its_traceback():
    with pytest.raises(RuntimeError, match="rank 1 failed(.|\n)*deliberate failure on rank one"):
        run_distributed(_fail_on_rank_one, 2, timeout=30)


def _hang() -> None:
    if dist.get_rank() == 0:
        time.sleep(60)


def test_helper_times_out_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 2 s"):
        run_distributed(_hang, 2, timeout=2)
    assert time.monotonic() - start < 60  # the first call also starts the fork server


# ------------------------------------------------------------------------------- collectives


def _collectives() -> dict:
    rank = dist.get_rank()
    world = D.current_world()
    summed = D.all_reduce_sum(torch.tensor([rank + 1, 10 * rank], dtype=torch.int64))
    mean = D.all_reduce_mean(torch.tensor([float(rank)]))
    obj = D.broadcast_object({"from": rank})
    gathered = D.all_gather_object(rank * 2)
    D.barrier(timeout_s=10)
    return {
        "world": (world.rank, world.world_size, world.is_main),
        "sum": summed.tolist(),
        "mean": mean.item(),
        "obj": obj,
        "gathered": gathered,
    }


def test_world_and_collectives_across_two_ranks():
    r0, r1 = run_distributed(_collectives, 2)
    assert r0["world"] == (0, 2, True) and r1["world"] == (1, 2, False)
    for r in (r0, r1):
        assert r["sum"] == [3, 10]
        assert r["mean"] == pytest.approx(0.5)
        assert r["obj"] == {"from": 0}
        assert r["gathered"] == [0, 2]


def test_single_process_helpers_are_identities(monkeypatch):
    for key in D.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    assert D.init_distributed() == D.World(0, 1, 0)
    t = torch.tensor([2.0])
    assert D.all_reduce_sum(t) is t and t.item() == 2.0
    assert D.broadcast_object("x") == "x" and D.all_gather_object(3) == [3]


def test_bad_launch_environment_is_a_config_error(monkeypatch):
    from moesaic.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ConfigError, match="RANK=5"):
        D.env_world()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        D.init_distributed()


# ------------------------------------------------------------------------------- clip_grad_norm


def _clip(max_norm: float) -> tuple[float, list[torch.Tensor]]:
    from torch.distributed.fsdp import fully_shard

    model = _toy()
    mesh = D.build_meshes("cpu", dist.get_world_size(), 1).dp
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(dist.get_rank()))
    model(x).square().sum().backward()
    norm = D.clip_grad_norm(model.parameters(), max_norm)
    return norm.item(), [p.grad.full_tensor() for p in model.parameters()]


def test_clip_grad_norm_of_sharded_gradients_matches_torch():
    results = run_distributed(_clip, 2, 0.5)
    model = _toy()
    for rank in range(2):
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(rank))
        (model(x).square().sum() / 2).backward()
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    for norm, grads in results:
        assert norm == pytest.approx(expected.item(), rel=1e-5)
        for g, p in zip(grads, model.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- sharded checkpoints


def _toy() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    model.register_buffer("counts", torch.arange(5.0))
    return model


def _train_toy(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()


def _save_sharded_toy(path: str) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import fully_shard

    model = _toy()
    mesh = D.build_meshes("cpu", dist.get_world_size(), 1).dp
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    _train_toy(model, opt, seed=dist.get_rank())
    dcp_ckpt.save_dcp(path, model, opt)
    full = dcp_ckpt.full_model_state(model)
    optim = {
        f"{i}/{k}": v.full_tensor() if hasattr(v, "full_tensor") else v
        for i, (p, s) in enumerate(opt.state.items())
        for k, v in s.items()
    }
    return {"model": full, "optim": optim}


def test_sharded_save_at_two_ranks_loads_in_one_process(tmp_path):
    saved = run_distributed(_save_sharded_toy, 2, str(tmp_path))[0]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and all(n.endswith(".safetensors") for n in names)
    assert not list(tmp_path.glob("*.metadata")), "the pickled DCP index must not be written"

    model = _toy()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.counts.zero_()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    dcp_ckpt.load_dcp(tmp_path, model, opt)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved["model"][name], rtol=0, atol=0)
    loaded = {f"{i}/{k}": v for i, (p, s) in enumerate(opt.state.items()) for k, v in s.items()}
    assert loaded.keys() == saved["optim"].keys()
    for key, value in loaded.items():
        torch.testing.assert_close(value, saved["optim"][key], rtol=0, atol=0)


def _load_sharded_toy(path: str) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import fully_shard

    model = _toy()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    mesh = D.build_meshes("cpu", dist.get_world_size(), 1).dp
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    dcp_ckpt.load_dcp(path, model, opt)
    return dcp_ckpt.full_model_state(model)


def test_single_process_save_loads_sharded_at_two_ranks(tmp_path):
    model = _toy()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    _train_toy(model, opt, seed=3)
    dcp_ckpt.save_dcp(tmp_path, model, opt)
    loaded = run_distributed(_load_sharded_toy, 2, str(tmp_path))[0]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)


def test_loading_shards_into_another_model_is_a_checkpoint_error(tmp_path):
    model = _toy()
    dcp_ckpt.save_dcp(tmp_path, model, None)
    other = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(CheckpointError, match="does not fit the model"):
        dcp_ckpt.load_dcp(tmp_path, other, None)


# ------------------------------------------------------------------------------- data positions


def _stream_state(rank: int, world: int, counters: dict, produced: dict) -> dict:
    return {
        "version": 1,
        "rank": rank,
        "world_size": world,
        "counters": counters,
        "produced": produced,
        "pending": [["text", 7]],
        "rows": 10,
        "stats": {"docs": 5},
        "skipped": {"bad": 1},
    }


def test_restart_stream_state_never_repeats_a_document():
    old = [
        _stream_state(0, 2, {"text": 5, "image": 2}, {"text": 300, "image": 100}),
        _stream_state(1, 2, {"text": 4, "image": 3}, {"text": 280, "image": 120}),
    ]
    used = {(k, c * 2 + s["rank"]) for s in old for k, n in s["counters"].items() for c in range(n)}
    for new_world in (1, 3):
        states = [dcp_ckpt.rank_stream_state({"data": old}, r, new_world) for r in range(new_world)]
        for r, s in enumerate(states):
            assert (s["rank"], s["world_size"], s["pending"]) == (r, new_world, [])
            for kind, c in s["counters"].items():
                assert (kind, c * new_world + r) not in used
                assert all(g < c * new_world + r for k, g in used if k == kind)
        assert states[0]["stats"] == {"docs": 10} and states[0]["skipped"] == {"bad": 2}
        assert sum(s["produced"]["text"] for s in states) == pytest.approx(580, abs=new_world)
    same = dcp_ckpt.rank_stream_state({"data": old}, 1, 2)
    assert same == old[1]
    with pytest.raises(CheckpointError, match="world size it was saved with"):
        dcp_ckpt.restart_stream_state([{"version": 1}], 0, 3)


# ------------------------------------------------------------------------------- a dead rank


def _ready() -> None:
    """Tell the test (which hosts the store) that this rank is in its loop."""
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False
    )
    store.set(f"ready/{dist.get_rank()}", "1")


def _heartbeat_then_wait(watchdog_s: float) -> None:
    """Both ranks start the watchdog; rank 0 then idles outside any collective."""
    dog = Watchdog(D.current_world(), watchdog_s).start()
    dist.barrier()
    _ready()
    if dist.get_rank() == 0:
        time.sleep(120)
    else:
        dist.barrier()  # waits for rank 0 until it is killed
    dog.stop()


def _collective_loop() -> None:
    t = torch.ones(4)
    dist.all_reduce(t)
    _ready()
    for _ in range(100_000):
        dist.all_reduce(t)
        time.sleep(0.01)


@pytest.mark.parametrize("body", ["watchdog", "collective"])
def test_a_killed_rank_makes_the_other_exit_nonzero_quickly(body):
    fn, args = (_heartbeat_then_wait, (2.0,)) if body == "watchdog" else (_collective_loop, ())
    procs, results, store = start_workers(fn, 2, args, timeout_s=20.0)
    try:
        store.wait(["ready/0", "ready/1"], datetime.timedelta(seconds=120))
        assert all(p.is_alive() for p in procs)
        victim = 1 if body == "watchdog" else 0
        os.kill(procs[victim].pid, signal.SIGKILL)
        survivor = procs[1 - victim]
        start = time.monotonic()
        survivor.join(timeout=60)
        assert not survivor.is_alive(), "the surviving rank hung after its peer died"
        assert survivor.exitcode != 0
        assert time.monotonic() - start < 30
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        del store
