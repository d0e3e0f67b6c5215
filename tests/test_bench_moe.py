"""`moesaic bench moe`: peers compute the same layer as moesaic; the report has its schema."""

import argparse
import json

import pytest
import torch

from moesaic.bench import moe as bench
from moesaic.bench import moe_peers as peers
from moesaic.model import native

TINY = bench.Shape("coarse", experts=8, top_k=2, expert_hidden=16, dim=32, tokens=64)


def _layer(shape=TINY, seed=0):
    moe = bench.build_moe(shape, "auto", seed)
    with torch.no_grad():  # larger weights than the 0.02 init, so differences would show
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


def _x(shape=TINY, seed=1):
    return torch.randn(shape.tokens, shape.dim, generator=torch.Generator().manual_seed(seed))


def _out_and_grad(fn, x):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad


def _moesaic(moe, shape=TINY):
    meta = bench._meta(shape.tokens, torch.device("cpu"))
    return lambda x: moe(x, meta)[0]


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_hf_qwen3_moe_block_equals_moesaic(impl):
    """Softmax router, top-k, renormalised gates: Qwen3-MoE (norm_topk_prob) is the same layer."""
    pytest.importorskip("transformers", reason="transformers not installed (optional extra)")
    if impl not in peers.hf_implementations():
        pytest.skip(f"transformers {peers.hf_version()} has no '{impl}' expert implementation")
    moe = _layer()
    block = peers.HFBlock(peers.hf_block(moe, impl))
    x = _x()
    y_ref, gx_ref = _out_and_grad(_moesaic(moe), x)
    y, gx = _out_and_grad(block, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    # router and expert weights were copied, not shared: their gradients are HF's own
    w_grad = block.block.experts.down_proj.grad
    torch.testing.assert_close(w_grad.transpose(1, 2), moe.experts.w_down_EHD.grad)


def test_split_loop_and_roomy_one_hot_equal_moesaic():
    moe = _layer()
    x = _x()
    y_ref, gx_ref = _out_and_grad(_moesaic(moe), x)
    for module in (peers.SplitLoopMoE(moe), peers.OneHotMoE(moe, capacity_factor=8.0)):
        y, gx = _out_and_grad(module, x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)


def test_one_hot_drops_assignments_past_capacity():
    moe = _layer()
    with torch.no_grad():
        moe.router.weight[0] += 5.0 * _x(seed=3).mean(0) / _x(seed=3).mean(0).norm()
    x = _x() + _x(seed=3).mean(0)  # most tokens prefer expert 0
    y_ref = _moesaic(moe)(x).detach()
    y = peers.OneHotMoE(moe, capacity_factor=1.0)(x).detach()
    assert not torch.allclose(y, y_ref, rtol=1e-4, atol=1e-5)


def test_parity_check_raises_on_a_wrong_peer():
    moe = _layer()
    impls = {"moesaic": moe, "split-loop": peers.SplitLoopMoE(moe)}
    errors = bench.check_parity(impls, TINY, torch.device("cpu"), torch.float32)
    assert errors["split-loop"] < 1e-5
    with torch.no_grad():
        impls["split-loop"].w2_EHD[3] *= 1.01
    with pytest.raises(AssertionError, match="split-loop"):
        bench.check_parity(impls, TINY, torch.device("cpu"), torch.float32)


def test_bench_writes_report_with_schema(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "coarse", TINY)
    monkeypatch.setitem(
        bench.SHAPES,
        "fine",
        bench.Shape("fine", experts=16, top_k=4, expert_hidden=8, dim=32, tokens=64),  # fmt: skip
    )
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "moe.json"
    impls = ",".join(
        ["dense", "moesaic", "moesaic-native", "moesaic-split", "moesaic-grouped"]
        + ["split-loop", "one-hot"]
    )
    args = parser.parse_args(
        [
            "--shapes",
            "coarse,fine",
            "--impls",
            impls,
            "--rounds",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--omp-wait-policy",
            "inherit",
            "--json",
            str(out),
        ]  # fmt: skip
    )
    assert bench.run(args) == 0
    report = json.loads(out.read_text())
    assert report["torch"] == torch.__version__ and report["threads"] == 1
    rows = report["rows"]
    assert {r["shape"] for r in rows} == {"coarse", "fine"}
    for shape in ("coarse", "fine"):
        by_impl = {r["impl"]: r for r in rows if r["shape"] == shape}
        assert set(by_impl) == set(impls.split(","))
        built = native.available()
        if not built:  # no compiler here: a row that says why
            assert "cannot build" in by_impl.pop("moesaic-native")["skipped"]
        assert by_impl["dense"]["ratio_to_dense"] == 1.0
        for r in by_impl.values():
            assert r["ms"] > 0 and r["rounds"] == 2
            assert r["ratio_to_dense"] == pytest.approx(r["ms"] / by_impl["dense"]["ms"])
        assert by_impl["moesaic-split"]["path"] == "split"
        assert by_impl["moesaic-grouped"]["path"] == "grouped_mm"
        if built:
            assert by_impl["moesaic-native"]["path"] == "native"
            assert by_impl["moesaic"]["path"] == "native"  # auto on CPU: the C++ kernel
        parity = report["parity"][shape]  # max |output − moesaic's| of each checked peer
        assert set(parity) >= {"moesaic-split", "split-loop"}
        assert "moesaic-native" in parity or not built
        assert all(0 <= err < 1e-4 for err in parity.values()), parity


def test_unknown_shape_is_config_error():
    from moesaic.errors import ConfigError

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--shapes", "huge", "--omp-wait-policy", "inherit"])
    with pytest.raises(ConfigError, match="huge"):
        bench.run(args)
