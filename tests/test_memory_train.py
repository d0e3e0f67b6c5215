"""Training with the n-gram memory: the lazy row AdamW, clipping of sparse gradients, the
training loop, exact resume, bf16, FSDP on 2 CPU processes, `moesaic info`."""

from __future__ import annotations

import math
import signal

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from moesaic.config import DistConfig, TrainConfig, load_config
from moesaic.model.memory import memory_layers
from moesaic.train.loop import Trainer
from moesaic.train.metrics import read_metrics
from moesaic.train.optim import (
    LazyRowAdamW,
    build_optimizer,
    clip_grad_norm_,
    load_optimizer_state,
    optimizer_state_to_tensors,
)
from tests.dist_utils import run_distributed
from tests.memory_utils import MICRO_MEMORY, memory_config
from tests.model_utils import random_batch
from tests.train_utils import MICRO

# ------------------------------------------------------------------ the lazy row AdamW

ROWS, WIDTH = 6, 3


class Table(torch.nn.Module):
    """One lookup table, trained lazily (group `lazy_rows`) or as a plain AdamW parameter."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(
            torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(0))
        )

    def loss(self, rows: torch.Tensor, probe: torch.Tensor, sparse: bool) -> torch.Tensor:
        return (F.embedding(rows, self.table, sparse=sparse) * probe).sum()


def _lazy(model: Table, wd: float = 0.1) -> LazyRowAdamW:
    group = {"params": [model.table], "weight_decay": wd, "lazy_rows": True}
    return LazyRowAdamW([group], lr=0.05, betas=(0.9, 0.95), eps=1e-8)


def _steps(model, opt, lookups, sparse: bool) -> None:
    g = torch.Generator().manual_seed(1)
    for i, rows in enumerate(lookups):
        for group in opt.param_groups:
            group["lr"] = 0.05 * (1 - 0.1 * i)  # a schedule, as the trainer sets it
        probe = torch.randn(len(rows), WIDTH, generator=g)
        model.loss(torch.tensor(rows), probe, sparse).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse-grad", "dense-grad"])
def test_lazy_adamw_equals_adamw_when_every_row_has_a_gradient(sparse):
    lookups = [[0, 1, 2, 3, 4, 5, 5, 2], [5, 4, 3, 2, 1, 0], [1, 0, 3, 2, 5, 4, 0]]
    lazy, dense = Table(), Table()
    _steps(lazy, _lazy(lazy), lookups, sparse)
    reference = torch.optim.AdamW([dense.table], lr=0.05, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.1, foreach=False)  # fmt: skip
    _steps(dense, reference, lookups, sparse=False)
    torch.testing.assert_close(lazy.table, dense.table, rtol=1e-6, atol=1e-7)
    assert not torch.equal(lazy.table, Table().table)


def test_lazy_adamw_leaves_rows_without_gradient_alone():
    model = Table()
    opt = _lazy(model, wd=0.0)
    _steps(model, opt, [[0, 1, 2]], sparse=True)
    after_one = model.table.detach().clone()
    m1 = opt.state[model.table]["exp_avg"].clone()
    v1 = opt.state[model.table]["exp_avg_sq"].clone()
    probe = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(3))
    model.loss(torch.tensor([2, 4]), probe, sparse=True).backward()
    opt.step()
    state = opt.state[model.table]
    assert float(state["step"]) == 2
    for r in (0, 1, 3, 5):  # no gradient: value and moments as they were (rows 3, 5 never moved)
        assert torch.equal(model.table[r], after_one[r])
        assert torch.equal(state["exp_avg"][r], m1[r]) and torch.equal(
            state["exp_avg_sq"][r], v1[r]
        )
    # row 4, first used in step 2: bias correction by the parameter's step count (2)
    g = probe[1]
    m, v = 0.1 * g, 0.05 * g * g
    expected = after_one[4] - 0.05 / (1 - 0.9**2) * m / ((v / (1 - 0.95**2)).sqrt() + 1e-8)
    torch.testing.assert_close(model.table[4], expected)
    torch.testing.assert_close(state["exp_avg"][4], m)
    assert not torch.equal(model.table[2], after_one[2])


def test_clip_grad_norm_takes_sparse_gradients():
    rows = torch.tensor([0, 3, 3, 5])
    grads = {}
    for sparse in (True, False):
        table = Table()
        linear = torch.nn.Linear(WIDTH, 2, bias=False)
        torch.nn.init.constant_(linear.weight, 0.7)
        linear(F.embedding(rows, table.table, sparse=sparse)).square().sum().backward()
        norm = clip_grad_norm_([table.table, linear.weight], 1.0)
        grads[sparse] = (float(norm), table.table.grad.to_dense(), linear.weight.grad)
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-6) and grads[True][0] > 1.0
    torch.testing.assert_close(grads[True][1], grads[False][1])
    torch.testing.assert_close(grads[True][2], grads[False][2])
    total = torch.cat([grads[True][1].flatten(), grads[True][2].flatten()]).norm()
    assert float(total) == pytest.approx(1.0, rel=1e-5)


def test_optimizer_state_of_a_memory_model_round_trips():
    def train(model, opt, steps):
        for i in steps:
            model(random_batch(2, 32, seed=i)).loss.backward()
            clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    cfg, tcfg = memory_config(), TrainConfig(lr=1e-2, warmup=0)
    torch.manual_seed(0)
    from moesaic.model import Transformer

    straight = Transformer(cfg)
    opt = build_optimizer(straight, tcfg)
    assert isinstance(opt, LazyRowAdamW) and memory_layers(straight)[0].sparse_grads
    assert [g.get("lazy_rows", False) for g in opt.param_groups] == [False, False, True]
    train(straight, opt, range(2))
    tensors, meta = optimizer_state_to_tensors(opt, straight)
    tensors = {k: v.clone() for k, v in tensors.items()}  # a checkpoint would be on disk
    weights = {k: v.clone() for k, v in straight.state_dict().items()}
    train(straight, opt, range(2, 4))

    torch.manual_seed(1)
    resumed = Transformer(cfg)
    resumed.load_state_dict(weights)
    opt2 = build_optimizer(resumed, tcfg)
    load_optimizer_state(opt2, resumed, tensors, meta)
    train(resumed, opt2, range(2, 4))
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


# ------------------------------------------------------------------ the training loop


def _cfg(tmp_path, *extra):
    return load_config("tiny", [*MICRO, *MICRO_MEMORY, f"out={tmp_path}", *extra])


def test_memory_model_trains_and_only_looked_up_rows_move(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=40", "train.warmup=5", "eval.every=0",
               "model.memory.table_rows=9973")  # fmt: skip
    trainer = Trainer(cfg)
    table = memory_layers(trainer.model)[0].table
    start = table.detach().clone()
    summary = trainer.run()
    assert summary["status"] == "finished" and summary["skipped_steps"] == 0
    rows = [r for r in read_metrics(tmp_path / "tiny" / "metrics.jsonl") if r["kind"] == "train"]
    first = sum(r["text_loss"] for r in rows[:5]) / 5
    last = sum(r["text_loss"] for r in rows[-5:]) / 5
    assert last < first - 0.5
    moved = (table.detach() != start).any(1)
    assert not moved[0] and 0.05 < moved.float().mean() < 0.95  # the zero row, unread rows stay
    assert summary["params_total"] > summary["params_active"]


def test_resume_with_memory_is_bit_identical(tmp_path):
    extra = ["train.steps=8", "train.checkpoint_every=0", "eval.every=4"]
    Trainer(_cfg(tmp_path, *extra, "name=ref")).run()

    cut = Trainer(_cfg(tmp_path, *extra, "name=cut"))
    step = cut.train_step

    def stop_after_five():
        values = step()
        if cut.step == 5:
            cut.stop_signal = signal.SIGTERM
        return values

    cut.train_step = stop_after_five
    assert cut.run()["status"] == "interrupted"
    run_dir = tmp_path / "cut"
    Trainer(load_config(run_dir / "config.yaml"), run_dir, resume=True).run()

    def last(name: str, file: str) -> dict[str, torch.Tensor]:
        ckpt = sorted((tmp_path / name / "checkpoints").iterdir())[-1]
        return load_file(str(ckpt / file))

    for file in ("model.safetensors", "optimizer.safetensors"):
        a, b = last("ref", file), last("cut", file)
        assert a.keys() == b.keys() and any("memory.table" in k for k in a)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{file}: {k} differs after resume"
    strip = ("tokens_per_s",)
    rows = [
        [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(d / "metrics.jsonl")]
        for d in (tmp_path / "ref", run_dir)
    ]
    assert rows[0] == rows[1]


def test_dense_adamw_option_trains_the_table_densely(tmp_path):
    cfg = _cfg(tmp_path, "model.memory.lazy_adam=false", "train.steps=2", "eval.every=0")
    trainer = Trainer(cfg)
    assert type(trainer.optimizer) is torch.optim.AdamW
    memory = memory_layers(trainer.model)[0]
    assert not memory.sparse_grads
    table = memory.table
    trainer.train_step()
    assert not table.grad  # zeroed (set to None) after the step
    with_moment = trainer.optimizer.state[table]["exp_avg"].ne(0).any(1)
    before = table.detach().clone()
    trainer.train_step()
    moved = (table.detach() != before).any(1)
    # dense AdamW: every row with a first moment moves again (momentum), also rows not read in
    # step 2; lazy rows would keep still
    assert with_moment.sum() > 10 and bool(moved[with_moment].all())


def test_bf16_training_with_memory_is_finite(tmp_path):
    cfg = _cfg(tmp_path, "train.precision=bf16", "train.steps=3", "eval.every=0",
               "train.checkpoint_every=0")  # fmt: skip
    summary = Trainer(cfg).run()
    assert summary["skipped_steps"] == 0
    assert all(math.isfinite(v) for v in summary["eval"].values())


def test_info_reports_the_memory(capsys):
    from moesaic.cli import main
    from moesaic.model.sizes import config_sizes as describe

    args = ["tiny", "model.memory.layers=[1, 2]", "model.memory.table_rows=1009"]
    assert main(["info", *args]) == 0
    out = capsys.readouterr().out
    info = describe(load_config(args[0], args[1:]))
    line = next(ln for ln in out.splitlines() if ln.startswith("memory"))
    assert (
        f"{info['memory_total']:,} params" in line and f"{info['memory_active']:,} active" in line
    )
    plain = describe(load_config("tiny"))
    assert info["params_total"] - plain["params_total"] == info["memory_total"]
    assert info["params_active"] - plain["params_active"] == info["memory_active"]
    assert info["memory_rows"] == 2 * (
        1 + sum(load_config(*args[:1], args[1:]).model.memory.table_moduli())
    )


# ------------------------------------------------------------------ FSDP (2 CPU processes)

STEPS = 3


def _train(rank: int, world: int, sharded: bool) -> dict:
    from moesaic.model import Transformer
    from moesaic.train import distributed as D

    torch.manual_seed(0)
    model = Transformer(memory_config(layers=[0, 1]))
    if sharded:
        D.parallelize(model, DistConfig(), torch.device("cpu"))
    opt = build_optimizer(model, TrainConfig(lr=1e-2, warmup=0, weight_decay=0.1))
    losses = []
    for step in range(STEPS):
        ranks = [rank] if sharded else range(world)
        total = 0.0
        for r in ranks:
            out = model(random_batch(2, 32, seed=100 * step + r))
            (out.loss / len(ranks)).backward()
            total += out.loss.item() / len(ranks)
        if sharded:
            D.clip_grad_norm([p for p in model.parameters() if p.grad is not None], 1.0)
            total = D.all_reduce_mean(torch.tensor(total)).item()
        else:
            clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    table = memory_layers(model)[0].table
    info = {"losses": losses, "sparse_grads": memory_layers(model)[0].sparse_grads}
    if sharded:
        from moesaic.train.dist_checkpoint import full_model_state

        info["sharded_rows"] = len(table.placements) == 1 and table.placements[0].is_shard(0)
        info["local_rows"] = table.to_local().shape[0]
        info["weights"] = full_model_state(model)
    else:
        info["weights"] = model.state_dict()
    return info


def _fsdp_rank() -> dict:
    import torch.distributed as dist

    return _train(dist.get_rank(), dist.get_world_size(), sharded=True)


def test_fsdp_shards_the_tables_and_trains_like_one_process():
    got = run_distributed(_fsdp_rank, 2)[0]
    ref = _train(0, 2, sharded=False)
    rows = ref["weights"]["blocks.0.memory.table"].shape[0]
    assert got["sharded_rows"] and got["local_rows"] == math.ceil(rows / 2)
    assert not got["sparse_grads"] and ref["sparse_grads"]  # FSDP reduces dense gradients
    for a, b in zip(got["losses"], ref["losses"], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    assert got["weights"].keys() == ref["weights"].keys()
    for name, value in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    from moesaic.model import Transformer

    torch.manual_seed(0)
    start = Transformer(memory_config(layers=[0, 1])).blocks[0].memory.table.detach()
    moved = (ref["weights"]["blocks.0.memory.table"] != start).any(1)
    assert 0 < moved.sum() < moved.numel()  # lazy: rows no rank read did not move


def _save_sharded(root: str) -> dict:
    import torch.distributed as dist

    from moesaic.model import Transformer
    from moesaic.train import dist_checkpoint as C
    from moesaic.train import distributed as D
    from tests.test_distributed_model import _full_optimizer_state

    torch.manual_seed(0)
    model = Transformer(memory_config(layers=[0, 1]))
    D.parallelize(model, DistConfig(), torch.device("cpu"))
    opt = build_optimizer(model, TrainConfig(lr=1e-2, warmup=0))
    model(random_batch(2, 32, seed=dist.get_rank())).loss.backward()
    opt.step()
    state = {"config_fingerprint": "f", "data": {}, "trainer": {}}
    path = C.save_sharded_checkpoint(root, 1, model, opt, {"cpu": torch.get_rng_state()}, state, 2)
    return {"path": str(path), "weights": C.full_model_state(model),
            "optim": _full_optimizer_state(model, opt)}  # fmt: skip


def test_sharded_checkpoint_of_memory_tables_loads_into_one_process(tmp_path):
    from moesaic.model import Transformer
    from moesaic.train import dist_checkpoint as C
    from tests.test_distributed_model import _assert_same, _full_optimizer_state

    saved = run_distributed(_save_sharded, 2, str(tmp_path))[0]
    assert any(k.endswith("memory.table/exp_avg_sq") for k in saved["optim"])
    torch.manual_seed(1)
    model = Transformer(memory_config(layers=[0, 1]))
    opt = build_optimizer(model, TrainConfig(lr=1e-2, warmup=0))
    C.load_dcp(f"{saved['path']}/dcp", model, opt)
    _assert_same(model.state_dict(), saved["weights"])
    _assert_same(_full_optimizer_state(model, opt), saved["optim"])
    model(random_batch(2, 32, seed=7)).loss.backward()  # and it trains on: sparse gradients
    opt.step()
    assert memory_layers(model)[0].table.grad.is_sparse
