"""The real model under torch.distributed on CPU (gloo): expert parallelism equals the
single-process MoE (forward and backward, also when a rank's experts receive no tokens), and
FSDP2 data-parallel training equals single-process training at the same global batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moesaic.config import DistConfig, FFNConfig, TrainConfig
from moesaic.model import Transformer
from moesaic.model.ffn import TokenMeta
from moesaic.model.moe import MoE, update_router_biases
from moesaic.train import distributed as D
from moesaic.train.expert_parallel import apply_expert_parallel
from moesaic.train.optim import build_optimizer
from tests.dist_utils import run_distributed
from tests.model_utils import moe_config, random_batch, tiny_config

DIM, TOKENS, EXPERTS = 32, 24, 4

# ------------------------------------------------------------------------------- expert parallel


def _moe(favoured: tuple[int, ...]) -> MoE:
    torch.manual_seed(0)
    cfg = FFNConfig(kind="moe", hidden=64, experts=EXPERTS, granularity=2, bias_rate=0.01)
    moe = MoE(cfg, DIM)
    moe.reset_parameters(0.02, 0.01)
    with torch.no_grad():  # selection bias large enough that only `favoured` experts are picked
        for e in favoured:
            moe.router_bias[e] = 10.0
    return moe


def _inputs(rank: int) -> tuple[torch.Tensor, TokenMeta, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(TOKENS, DIM, generator=g)
    meta = TokenMeta(
        modality_T=torch.randint(0, 2, (TOKENS,), generator=g),
        doc_kind_T=torch.randint(0, 4, (TOKENS,), generator=g),
        t_T=torch.rand(TOKENS, generator=g),
        valid_T=torch.rand(TOKENS, generator=g) > 0.1,
    )
    return x, meta, torch.randn(TOKENS, DIM, generator=g)


def _ep_forward_backward(favoured: tuple[int, ...]) -> dict[str, torch.Tensor]:
    moe = _moe(favoured)
    mesh = D.build_meshes("cpu", dist.get_world_size(), 2).expert
    apply_expert_parallel(moe, mesh["ep"])
    x, meta, probe = _inputs(dist.get_rank())
    x.requires_grad_(True)
    y, aux = moe(x, meta)
    ((y * probe).sum() + aux).backward()
    experts = moe.experts
    return {
        "y": y.detach(),
        "x_grad": x.grad,
        "router_grad": moe.router.weight.grad,
        "w1_grad": experts.w_gate_up_EDH.grad.to_local(),
        "w2_grad": experts.w_down_EHD.grad.to_local(),
        "received": experts.w_gate_up_EDH.to_local().shape[0],
    }


@pytest.mark.parametrize(
    "favoured",
    [(), (0, 2), (0, 1)],
    ids=["random-routing", "one-empty-expert-per-rank", "rank1-receives-nothing"],
)
def test_expert_parallel_moe_equals_single_process(favoured):
    results = run_distributed(_ep_forward_backward, 2, favoured)
    moe = _moe(favoured)
    full_w1 = torch.zeros_like(moe.experts.w_gate_up_EDH)
    full_w2 = torch.zeros_like(moe.experts.w_down_EHD)
    L = EXPERTS // 2
    for rank, got in enumerate(results):
        moe.zero_grad()
        x, meta, probe = _inputs(rank)
        x.requires_grad_(True)
        y, aux = moe(x, meta)
        ((y * probe).sum() + aux).backward()
        torch.testing.assert_close(got["y"], y.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["x_grad"], x.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["router_grad"], moe.router.weight.grad, rtol=1e-5, atol=1e-6)
        full_w1 += moe.experts.w_gate_up_EDH.grad
        full_w2 += moe.experts.w_down_EHD.grad
    for rank, got in enumerate(results):
        local = slice(rank * L, (rank + 1) * L)
        assert got["received"] == L
        torch.testing.assert_close(got["w1_grad"], full_w1[local], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["w2_grad"], full_w2[local], rtol=1e-5, atol=1e-7)
    if favoured == (0, 1):  # rank 1 held experts no token chose: its gradients exist and are 0
        assert results[1]["w1_grad"].abs().max() == 0 and results[1]["w2_grad"].abs().max() == 0
        assert full_w1[:L].abs().max() > 0


def test_expert_parallel_size_must_divide_experts_and_world():
    from moesaic.errors import ConfigError

    with pytest.raises(ConfigError, match="does not divide the 2 processes"):
        D.build_meshes("cpu", 2, 3)


# ------------------------------------------------------------------------------- data parallel

STEPS, LR = 3, 1e-2
VARIANTS = {  # model, parallelism
    "dense-keep-gathered": (tiny_config, DistConfig(reshard_after_forward=False)),
    "moe": (lambda: moe_config(bias_rate=0.01, shared="per_modality"), DistConfig()),
    "moe-ep2": (lambda: moe_config(bias_rate=0.01), DistConfig(expert_parallel=2)),
}


def _train_cfg() -> TrainConfig:
    return TrainConfig(lr=LR, warmup=0, grad_clip=1.0)


def _batch(step: int, rank: int):
    return random_batch(B=2, L=32, seed=1000 * step + rank)


def _model(variant: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(VARIANTS[variant][0]())


def _dp_train(variant: str) -> dict:
    model = _model(variant)
    D.parallelize(model, VARIANTS[variant][1], torch.device("cpu"))
    opt = build_optimizer(model, _train_cfg())
    losses, norms = [], []
    for step in range(STEPS):
        out = model(_batch(step, dist.get_rank()))
        out.loss.backward()
        norms.append(D.clip_grad_norm(model.parameters(), 1.0).item())
        opt.step()
        update_router_biases(model, all_reduce=D.all_reduce_sum)
        opt.zero_grad(set_to_none=True)
        losses.append(D.all_reduce_mean(out.loss.detach().clone()).item())
    from moesaic.model.moe import moe_layers
    from moesaic.train.dist_checkpoint import full_model_state

    biases = [m.router_bias.clone() for m in moe_layers(model)]
    return {"losses": losses, "norms": norms, "weights": full_model_state(model), "bias": biases}


def _reference(variant: str, world: int = 2) -> dict:
    """One process, the ranks' batches as gradient-accumulation micro-batches."""
    model = _model(variant)
    opt = build_optimizer(model, _train_cfg())
    losses, norms = [], []
    for step in range(STEPS):
        total = 0.0
        for rank in range(world):
            out = model(_batch(step, rank))
            (out.loss / world).backward()
            total += out.loss.item() / world
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
        opt.step()
        update_router_biases(model)
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return {"losses": losses, "norms": norms, "weights": model.state_dict()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fsdp_training_matches_single_process_at_the_same_global_batch(variant):
    ranks = run_distributed(_dp_train, 2, variant)
    got, ref = ranks[0], _reference(variant)
    for a, b in zip(ranks[0]["bias"], ranks[1]["bias"], strict=True):  # identical on every rank
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if "moe" in variant:
        assert any(b.abs().sum() > 0 for b in got["bias"])  # the bias did move
    assert got["losses"][0] != got["losses"][-1]  # the weights did change between steps
    for a, b in zip(got["losses"], ref["losses"], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    for a, b in zip(got["norms"], ref["norms"], strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    assert got["weights"].keys() == ref["weights"].keys()
    for name, value in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], value, rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------- checkpoints


def _full_optimizer_state(model, opt) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if dist.is_initialized():
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(model, opt, options=options).get("state", {})
    else:
        state = get_optimizer_state_dict(model, opt)["state"]
    return {f"{name}/{k}": v for name, s in state.items() for k, v in s.items()}


def _one_step(model, opt, rank: int) -> None:
    model(_batch(0, rank)).loss.backward()
    opt.step()
    update_router_biases(model, all_reduce=D.all_reduce_sum)
    opt.zero_grad(set_to_none=True)


def _save_sharded(root: str, ep: int) -> dict:
    from moesaic.train import dist_checkpoint as C

    model = _model("moe-ep2")
    D.parallelize(model, DistConfig(expert_parallel=ep), torch.device("cpu"))
    opt = build_optimizer(model, _train_cfg())
    _one_step(model, opt, dist.get_rank())
    data = {"rank": dist.get_rank(), "rows": 2}
    state = {"config_fingerprint": "f", "data": data, "trainer": {"skipped_steps": 0}}
    rng = {"cpu": torch.get_rng_state()}
    path = C.save_sharded_checkpoint(root, 1, model, opt, rng, state, keep=2)
    weights = C.full_model_state(model)
    return {"path": str(path), "weights": weights, "optim": _full_optimizer_state(model, opt)}


def _load_sharded(path: str, ep: int) -> dict:
    from moesaic.train import dist_checkpoint as C

    model = _model("moe-ep2")
    D.parallelize(model, DistConfig(expert_parallel=ep), torch.device("cpu"))
    opt = build_optimizer(model, _train_cfg())
    C.load_dcp(f"{path}/dcp", model, opt)
    return {"weights": C.full_model_state(model), "optim": _full_optimizer_state(model, opt)}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_sharded_checkpoint_reshards_across_world_and_expert_parallel_sizes(tmp_path):
    from safetensors.torch import load_file

    from moesaic.train import dist_checkpoint as C

    saved = run_distributed(_save_sharded, 2, str(tmp_path), 2)[0]
    found = C.verify_any(saved["path"], "f")  # files, fingerprint, optimizer step counters
    assert found.step == 1 and found.state["world_size"] == 2
    assert found.state["data"] == [{"rank": 0, "rows": 2}, {"rank": 1, "rows": 2}]
    _assert_same(load_file(f"{saved['path']}/model.safetensors"), saved["weights"])
    assert set(load_file(f"{saved['path']}/rng.safetensors")) == {"cpu/0", "cpu/1"}

    model = _model("moe-ep2")  # one process, plain tensors
    opt = build_optimizer(model, _train_cfg())
    C.load_dcp(f"{saved['path']}/dcp", model, opt)
    _assert_same(model.state_dict(), saved["weights"])
    _assert_same(_full_optimizer_state(model, opt), saved["optim"])

    again = run_distributed(_load_sharded, 2, saved["path"], 1)[0]  # 2 ranks, no expert parallel
    _assert_same(again["weights"], saved["weights"])
    _assert_same(again["optim"], saved["optim"])


def _load_full(model_state: dict, optim_tensors: dict) -> dict:
    from moesaic.train import dist_checkpoint as C

    model = _model("moe-ep2")
    D.parallelize(model, DistConfig(expert_parallel=2), torch.device("cpu"))
    opt = build_optimizer(model, _train_cfg())
    C.load_full_state(model, opt, model_state, optim_tensors)
    return {"weights": C.full_model_state(model), "optim": _full_optimizer_state(model, opt)}


def test_single_process_state_loads_into_expert_parallel_shards():
    from moesaic.train.optim import optimizer_state_to_tensors

    model = _model("moe-ep2")
    opt = build_optimizer(model, _train_cfg())
    _one_step(model, opt, 0)
    tensors, _ = optimizer_state_to_tensors(opt, model)
    got = run_distributed(_load_full, 2, model.state_dict(), tensors)[0]
    _assert_same(got["weights"], model.state_dict())
    _assert_same(got["optim"], _full_optimizer_state(model, opt))
