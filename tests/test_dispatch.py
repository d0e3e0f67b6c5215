"""Dispatch backends (C++ kernel, grouped matmul, split) equal a per-token reference."""

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from model_utils import dispatch_gradcheck

from moesaic.errors import ConfigError
from moesaic.model import native
from moesaic.model.dispatch import dispatch, sort_by_expert
from moesaic.model.experts import BACKENDS, Experts, grouped_mm_supported

# the C++ kernel's backend where it can be built (a machine without a compiler skips it)
HERE = [b for b in BACKENDS if b != "auto" and (b != "native" or native.compiler_found())]


def reference_moe(x_TD, expert_TK, gate_TK, experts: Experts):
    """y_t = Σ_j gate[t, j] · SwiGLU_{expert[t, j]}(x_t), one token at a time."""
    w1, w2 = experts.w_gate_up_EDH, experts.w_down_EHD
    H = experts.hidden
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros(x_TD.shape[1])
        for j in range(expert_TK.shape[1]):
            e = int(expert_TK[t, j])
            gu = x_TD[t] @ w1[e]
            y = y + gate_TK[t, j] * ((F.silu(gu[:H]) * gu[H:]) @ w2[e])
        rows.append(y)
    return torch.stack(rows)


def make(E, D, H, backend, seed=0):
    torch.manual_seed(seed)
    ex = Experts(E, D, H, backend)
    ex.reset_parameters(0.5, 0.5)
    return ex


def run(ex, x, expert_TK, gate_TK):
    x = x.clone().requires_grad_(True)
    gate = gate_TK.clone().requires_grad_(True)
    y = dispatch(x, expert_TK, gate, ex)
    g_out = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y * g_out).sum().backward()
    grads = (x.grad, gate.grad, ex.w_gate_up_EDH.grad, ex.w_down_EHD.grad)
    for p in ex.parameters():
        p.grad = None
    return y.detach(), grads


def assert_same(got, want, tol=1e-6):
    """Outputs and gradients of two `run`s agree."""
    (y, grads), (y_want, grads_want) = got, want
    torch.testing.assert_close(y, y_want, atol=tol, rtol=tol)
    for a, b in zip(grads, grads_want, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def assert_all_equal_split(results):
    """Every backend's `run` agrees with the split loop's, to fp32 rounding: the backends sum in
    different orders (batched, grouped or per-expert matmuls), and the C++ kernel may put the
    gates on the other side (`gates_in_combine`)."""
    for backend in results.keys() - {"split"}:
        assert_same(results[backend], results["split"], tol=1e-5)


def routing(T, E, k, seed, skew=False):
    g = torch.Generator().manual_seed(seed)
    if skew:  # most tokens pick from the first two experts; some experts get nothing
        logits = torch.randn(T, E, generator=g)
        logits[:, :2] += 5.0
    else:
        logits = torch.randn(T, E, generator=g)
    expert_TK = logits.topk(k, dim=-1).indices
    gate_TK = torch.rand(T, k, generator=g)
    return expert_TK, gate_TK


@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("H", [8, 16])  # gates on the activations (H 8), in the combine (H 16)
def test_backends_equal_each_other_and_reference(skew, H):
    T, E, k, D = 24, 6, 2, 16
    expert_TK, gate_TK = routing(T, E, k, 1, skew)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    results = {}
    for backend in HERE:
        ex = make(E, D, H, backend)
        assert ex.path(x) == backend
        results[backend] = run(ex, x, expert_TK, gate_TK)
    assert_all_equal_split(results)
    ys, gs = results["split"]
    # the plain reference, with autograd through the loop
    ex = make(E, D, H, "split")
    xr = x.clone().requires_grad_(True)
    gr = gate_TK.clone().requires_grad_(True)
    yr = reference_moe(xr, expert_TK, gr, ex)
    (yr * torch.linspace(-1, 1, yr.numel()).view_as(yr)).sum().backward()
    torch.testing.assert_close(ys, yr.detach(), atol=1e-5, rtol=1e-5)
    ref_grads = (xr.grad, gr.grad, ex.w_gate_up_EDH.grad, ex.w_down_EHD.grad)
    for a, b in zip(gs, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_experts_with_zero_tokens_get_zero_grad():
    T, E, D, H = 10, 5, 16, 8
    expert_TK = torch.tensor([[0], [2]] * 5)  # experts 1, 3, 4 receive nothing
    gate = torch.ones(T, 1)
    x = torch.randn(T, D)
    for backend in HERE:
        ex = make(E, D, H, backend)
        y, (gx, _, g1, g2) = run(ex, x, expert_TK, gate)
        assert torch.isfinite(y).all()
        for e in (1, 3, 4):
            assert g1[e].abs().sum() == 0 and g2[e].abs().sum() == 0
        assert g1[0].abs().sum() > 0 and g1[2].abs().sum() > 0


def test_sort_by_expert_is_stable_permutation():
    expert_TK = torch.tensor([[2, 0], [0, 1], [2, 1]])
    r = sort_by_expert(expert_TK, 4)
    assert r.counts_E.tolist() == [2, 2, 2, 0]
    assert r.order_S.tolist() == [1, 2, 3, 5, 0, 4]  # within an expert, token order is kept
    assert r.token_S.tolist() == [0, 1, 1, 2, 0, 2]
    assert torch.equal(r.order_S[r.inverse_S], torch.arange(6))


def test_dispatch_is_deterministic():
    T, E, k, D, H = 40, 8, 3, 16, 8
    expert_TK, gate_TK = routing(T, E, k, 3)
    x = torch.randn(T, D)
    a = run(make(E, D, H, "auto"), x, expert_TK, gate_TK)
    b = run(make(E, D, H, "auto"), x, expert_TK, gate_TK)
    assert torch.equal(a[0], b[0])
    for ga, gb in zip(a[1], b[1], strict=True):
        assert torch.equal(ga, gb)


def test_grouped_mm_support_checks_alignment_and_dtype():
    ex = make(4, 16, 8, "auto")
    assert grouped_mm_supported(torch.randn(3, 16), ex.w_gate_up_EDH, ex.w_down_EHD)
    odd = make(4, 6, 3, "auto")  # 6 fp32 = 24-byte rows: not 16-byte aligned
    assert not grouped_mm_supported(torch.randn(3, 6), odd.w_gate_up_EDH, odd.w_down_EHD)
    assert odd.path(torch.randn(3, 6)) != "grouped_mm"
    assert not grouped_mm_supported(
        torch.randn(3, 16, dtype=torch.float64),
        ex.w_gate_up_EDH.double(),
        ex.w_down_EHD.double(),
    )
    forced = make(4, 6, 3, "grouped_mm")
    with pytest.raises(ConfigError, match="dispatch=auto"):
        forced(torch.randn(3, 6), torch.tensor([3, 0, 0, 0]))


def test_unaligned_auto_falls_back_to_split_and_matches_reference(monkeypatch):
    monkeypatch.setenv("MOESAIC_NATIVE", "0")  # the PyTorch paths (native takes any width)
    T, E, k, D, H = 12, 4, 2, 6, 3
    expert_TK, gate_TK = routing(T, E, k, 4)
    x = torch.randn(T, D)
    ex = make(E, D, H, "auto")
    assert ex.path(x) == "split"
    y, _ = run(ex, x, expert_TK, gate_TK)
    torch.testing.assert_close(y, reference_moe(x, expert_TK, gate_TK, ex).detach())


def test_unknown_backend_is_config_error():
    with pytest.raises(ConfigError, match="dispatch='fast'"):
        Experts(4, 16, 8, "fast")


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 33),
    E=st.integers(1, 9),
    k_frac=st.floats(0.0, 1.0),
    skew=st.floats(0.0, 8.0),
    seed=st.integers(0, 2**16),
    H=st.sampled_from([4, 8]),
)
def test_dispatch_property(T, E, k_frac, skew, seed, H):
    """Random sizes and skewed routing: every backend equals the reference, values and grads."""
    k = 1 + int(k_frac * (E - 1))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    logits[:, 0] += skew
    expert_TK = logits.topk(k, dim=-1).indices
    gate_TK = torch.rand(T, k, generator=g)
    D = 8
    x = torch.randn(T, D, generator=g)
    out = {b: run(make(E, D, H, b, seed), x, expert_TK, gate_TK) for b in HERE}
    assert_all_equal_split(out)
    ys, _ = out["split"]
    ref = reference_moe(x, expert_TK, gate_TK, make(E, D, H, "split", seed))
    torch.testing.assert_close(ys, ref.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [b for b in HERE if b != "grouped_mm"])
@pytest.mark.parametrize("in_combine", [False, True])
@pytest.mark.parametrize("bags", [True, False])  # CPU's embedding_bag sums, or other devices'
def test_gate_placement_gradcheck(backend, in_combine, bags, monkeypatch):
    """Gates on the activations or in the combine: exact gradients of x, gates and weights,
    with the CPU's row sums and with the gather-and-sum used on other devices."""
    import moesaic.model.dispatch as d

    monkeypatch.setattr(d, "gates_in_combine", lambda experts, native=False: in_combine)
    import moesaic.model.rows as r

    monkeypatch.setattr(d, "bag_sums", lambda t: bags)
    monkeypatch.setattr(r, "bag_sums", lambda t: bags)
    E, D, H = 3, 4, 3
    expert_TK = torch.tensor([[0, 1], [1, 0], [0, 2], [0, 1], [2, 0], [1, 2], [0, 1]])
    assert dispatch_gradcheck(make(E, D, H, backend).double(), expert_TK, D)


def test_gate_placements_agree(monkeypatch):
    """Scaling activations and scaling outputs give the same values and gradients."""
    import moesaic.model.dispatch as d

    T, E, k, D, H = 30, 4, 2, 16, 16
    expert_TK, gate_TK = routing(T, E, k, 3, skew=True)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(4))
    out = {}
    for in_combine in (False, True):
        monkeypatch.setattr(d, "gates_in_combine", lambda experts, native=False, v=in_combine: v)
        out[in_combine] = run(make(E, D, H, "grouped_mm"), x, expert_TK, gate_TK)
    assert_same(out[False], out[True], tol=1e-5)


def test_gates_in_combine_picks_the_narrower_side():
    from moesaic.model.dispatch import gates_in_combine

    assert gates_in_combine(Experts(8, 256, 512))  # coarse: outputs narrower than activations
    assert gates_in_combine(Experts(16, 128, 128))  # equal widths: 2 [N, D] passes < 3 [N, H]
    assert not gates_in_combine(Experts(64, 256, 64))  # fine-grained: activations narrower
    # on the C++ kernel only when the activations are at least twice as wide as the outputs
    assert gates_in_combine(Experts(8, 256, 512), native=True)
    assert not gates_in_combine(Experts(16, 128, 128), native=True)


def test_swiglu_backward_matches_autograd():
    from moesaic.model.experts import swiglu

    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (x,))
    gate, up = x.detach().chunk(2, -1)
    torch.testing.assert_close(swiglu(x), F.silu(gate) * up)


def test_swiglu_with_gate_scale_backward_matches_autograd():
    from moesaic.model.experts import swiglu

    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    s = torch.rand(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (x, s))
