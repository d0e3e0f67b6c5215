"""The CPU expert kernel: equal to the PyTorch paths in every scheduling case, exact gradients,
and a clear fallback or error when it cannot be built."""

import warnings
from pathlib import Path

import pytest
import torch
from model_utils import dispatch_gradcheck

from moesaic.errors import ConfigError
from moesaic.model import native
from moesaic.model.dispatch import dispatch
from moesaic.model.experts import Experts, native_experts

needs_compiler = pytest.mark.skipif(
    not native.compiler_found(), reason="no C++ compiler to build the kernel with"
)


@pytest.fixture
def threads():
    """Run a test at a given torch thread count (the suite runs single-threaded)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def experts(E, D, H, backend, dtype=torch.float32):
    torch.manual_seed(0)
    ex = Experts(E, D, H, backend)
    ex.reset_parameters(0.3, 0.3)
    return ex.to(dtype)


def rows_and_counts(counts, D, dtype=torch.float32, seed=1):
    counts_E = torch.tensor(counts, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(int(counts_E.sum()), D, generator=g).to(dtype)
    scale = torch.rand(x.shape[0], generator=g, dtype=torch.float32)
    return x, counts_E, scale.to(torch.promote_types(dtype, torch.float32))


def forward_backward(ex, x, counts_E, scale):
    x = x.clone().requires_grad_(True)
    scale = None if scale is None else scale.clone().requires_grad_(True)
    y = ex(x, counts_E, scale)
    g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (y * g).sum().backward()
    grads = [x.grad, ex.w_gate_up_EDH.grad, ex.w_down_EHD.grad]
    grads.append(None if scale is None else scale.grad)
    for p in ex.parameters():
        p.grad = None
    return [y.detach(), *grads]


# Scheduling cases at 2 threads: every expert in the per-thread region (8 balanced experts);
# one expert over a thread's fair share (run with all threads) next to small ones in the region;
# too few experts for the region (all run with all threads); experts without rows.
COUNTS = {
    "region": [9, 7, 8, 8, 6, 10, 8, 8],
    "big-and-region": [40, 3, 5, 4, 6, 2, 5, 3, 4, 0],
    "too-few": [13, 11],
    "empty": [0, 12, 0, 0, 9, 0],
}


@needs_compiler
@pytest.mark.parametrize("case", list(COUNTS))
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_native_equals_split_loop(case, scaled, num_threads, threads):
    threads(num_threads)
    counts = COUNTS[case]
    D, H = 16, 12
    x, counts_E, scale = rows_and_counts(counts, D)
    scale = scale if scaled else None
    got = forward_backward(experts(len(counts), D, H, "native"), x, counts_E, scale)
    want = forward_backward(experts(len(counts), D, H, "split"), x, counts_E, scale)
    for a, b in zip(got, want, strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    dw1 = got[2]
    for e, n in enumerate(counts):
        assert (dw1[e].abs().sum() == 0) == (n == 0)


@needs_compiler
@pytest.mark.parametrize("case", ["region", "big-and-region"])
def test_native_gradcheck(case, threads):
    """Exact float64 gradients of rows, both weights and the row scales, in the per-thread
    region (where worker threads must not record autograd history)."""
    threads(2)
    counts = COUNTS[case]
    D, H = 5, 3
    ex = experts(len(counts), D, H, "native", torch.float64)
    x, counts_E, scale = rows_and_counts(counts, D, torch.float64)
    w1, w2 = (p.detach().clone().requires_grad_(True) for p in ex.parameters())
    x.requires_grad_(True)
    scale.requires_grad_(True)

    def f(x, w1, w2, scale):
        return native_experts(x, w1, w2, counts_E, scale)

    assert torch.autograd.gradcheck(f, (x, w1, w2, scale))
    assert torch.autograd.gradcheck(lambda x, w1, w2: f(x, w1, w2, None), (x, w1, w2))


@needs_compiler
def test_native_bf16_autocast_is_as_close_to_fp32_as_grouped(threads):
    """Under bf16 autocast the kernel's outputs and gradients stay within bf16 rounding of the
    fp32 result (relative to the largest value), as the grouped-matmul path's do."""
    threads(2)
    E, D, H, T, k = 8, 32, 32, 64, 2
    expert_TK = torch.arange(T * k).remainder(E).view(T, k)
    gate_TK = torch.rand(T, k, generator=torch.Generator().manual_seed(3))
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(4))
    out = {}
    for backend, bf16 in (("split", False), ("native", True), ("grouped_mm", True)):
        ex = experts(E, D, H, backend)
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = dispatch(xx, expert_TK, gate_TK, ex)
        y.float().square().sum().backward()
        out[backend] = (y.float(), xx.grad, ex.w_gate_up_EDH.grad, ex.w_down_EHD.grad)
    for backend in ("native", "grouped_mm"):
        for got, want in zip(out[backend], out["split"], strict=True):
            assert got.dtype == torch.float32
            assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_turned_off_auto_uses_pytorch_paths_and_native_is_refused(monkeypatch):
    monkeypatch.setenv("MOESAIC_NATIVE", "0")
    x = torch.randn(4, 16)
    assert experts(4, 16, 8, "auto").path(x) == "grouped_mm"
    with pytest.raises(ConfigError, match=r"dispatch='native'.*MOESAIC_NATIVE=0.*dispatch=auto"):
        Experts(4, 16, 8, "native")


def test_failed_build_falls_back_once_with_a_one_line_reason(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setenv("MOESAIC_NATIVE_DIR", str(tmp_path))  # no finished build to load

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("Error building extension 'moesaic_experts'\nc++: not found\n...")

    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setattr(cpp_extension, "load", broken)
    native._warn_once.cache_clear()
    ex = experts(4, 16, 8, "auto")
    x = torch.randn(6, 16)
    with pytest.warns(
        RuntimeWarning, match=r"cannot build the CPU expert kernel: c\+\+: not found; using"
    ):
        assert ex.path(x) == "grouped_mm"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert ex.path(x) == "grouped_mm"
        y = ex(x, torch.tensor([2, 0, 3, 1]))
    assert torch.isfinite(y).all() and len(calls) == 1  # built once per process
    with pytest.raises(ConfigError) as info:
        Experts(4, 16, 8, "native")
    assert "\n" not in str(info.value) and "c++: not found" in str(info.value)
    native._warn_once.cache_clear()


@needs_compiler
def test_native_refuses_other_devices():
    ex = experts(2, 8, 4, "native")
    x, w1, w2 = (t.detach().to("meta") for t in (torch.empty(3, 8), *ex.parameters()))
    with pytest.raises(ConfigError, match="runs on CPU only"):
        native.chosen(ex.backend, x, w1, w2)
    assert not native.chosen("auto", x, w1, w2)


@needs_compiler
def test_kernel_checks_counts():
    ex = experts(3, 8, 4, "native")
    with pytest.raises(RuntimeError, match="do not sum"):
        ex(torch.randn(5, 8), torch.tensor([1, 2, 1]))


@needs_compiler
@pytest.mark.parametrize("counts", [[5, 0, 7], [0, 0, 0]])
def test_compute_with_given_weights_takes_the_kernel(counts, monkeypatch):
    """`Experts.compute` (what expert parallelism runs a rank's local experts through, possibly
    without rows) takes the kernel on CPU and equals the loop."""
    from moesaic.model import experts as experts_module

    ex = experts(len(counts), 8, 4, "auto")
    x, counts_E, scale = rows_and_counts(counts, 8)
    w1, w2 = ex.w_gate_up_EDH, ex.w_down_EHD
    calls = []
    real = experts_module.native_experts
    monkeypatch.setattr(experts_module, "native_experts", lambda *a: calls.append(1) or real(*a))
    got = ex.compute(x, w1, w2, counts_E, scale)
    want = experts(len(counts), 8, 4, "split").compute(x, w1, w2, counts_E, scale)
    assert calls == [1] and got.shape == (sum(counts), 8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def token_order(counts, D, k=2, seed=5):
    """Tokens [T, D] and the token of each sorted row (experts' rows in token order), for
    the kernel's token-order inputs; S = T·k rows as `counts` says."""
    S = sum(counts)
    g = torch.Generator().manual_seed(seed)
    T = max(1, S // k)
    x_TD = torch.randn(T, D, generator=g)
    token_S = torch.randint(0, T, (S,), generator=g)
    return x_TD, token_S


@needs_compiler
@pytest.mark.parametrize("case", list(COUNTS))
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_token_order_inputs_equal_gathered_inputs(case, scaled, num_threads, threads):
    """Rows copied inside the kernel (`rows`, `x_rows`, `dy_rows`) give exactly what rows
    gathered beforehand give, forward and backward, with fp32 tokens cast to bf16 weights too."""
    threads(num_threads)
    ext = native.load()
    counts = COUNTS[case]
    D, H = 16, 12
    counts_E = torch.tensor(counts)
    x_TD, token_S = token_order(counts, D)
    dy_TD = torch.randn_like(x_TD)
    _, _, scale = rows_and_counts(counts, D)
    scale = scale if scaled else None
    for dtype in (torch.float32, torch.bfloat16):
        ex = experts(len(counts), D, H, "native")
        w1, w2 = ex.w_gate_up_EDH.detach().to(dtype), ex.w_down_EHD.detach().to(dtype)
        x_SD = x_TD[token_S].to(dtype)
        dy_SD = dy_TD[token_S].to(dtype)
        y, gu = ext.experts_forward(x_SD, w1, w2, counts_E, scale)
        y_t, gu_t = ext.experts_forward(x_TD, w1, w2, counts_E, scale, token_S)
        assert torch.equal(y, y_t) and torch.equal(gu, gu_t) and y_t.dtype == dtype
        want = ext.experts_backward(dy_SD, x_SD, w1, w2, counts_E, scale, gu)
        got = ext.experts_backward(dy_TD, x_TD, w1, w2, counts_E, scale, gu, token_S, token_S)
        for a, b in zip(got, want, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


@needs_compiler
def test_kernel_checks_token_rows():
    ext = native.load()
    ex = experts(2, 8, 4, "native")
    w1, w2 = ex.w_gate_up_EDH.detach(), ex.w_down_EHD.detach()
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        ext.experts_forward(x, w1, w2, torch.tensor([1, 1]), None, torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="do not sum"):
        ext.experts_forward(x, w1, w2, torch.tensor([1, 2]), None, torch.tensor([0, 2]))


@needs_compiler
@pytest.mark.parametrize("T,k,E", [(50, 3, 7), (1, 1, 1), (0, 2, 4), (40, 8, 64)])
def test_counting_sort_equals_stable_argsort(T, k, E):
    from moesaic.model.dispatch import sort_by_expert

    g = torch.Generator().manual_seed(T + k + E)
    expert_TK = torch.randint(0, max(1, E // 2), (T, k), generator=g)  # some experts get none
    want = sort_by_expert(expert_TK, E)
    got = sort_by_expert(expert_TK, E, counting=True)
    for name in ("order_S", "token_S", "inverse_S", "counts_E"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    with pytest.raises(RuntimeError, match="out of range"):
        sort_by_expert(torch.full((2, 1), E), E, counting=True)


@needs_compiler
@pytest.mark.parametrize("in_combine", [False, True])
def test_dispatch_on_the_kernel_in_the_region(in_combine, threads, monkeypatch):
    """dispatch through the kernel with rows copied per expert, experts spread over 2 threads:
    equal to the split loop, and exact float64 gradients, with the gates on either side."""
    import moesaic.model.dispatch as d

    threads(2)
    monkeypatch.setattr(d, "gates_in_combine", lambda experts, native=False: in_combine)
    T, E, k, D, H = 48, 8, 2, 16, 8
    g = torch.Generator().manual_seed(7)
    expert_TK = torch.randn(T, E, generator=g).topk(k, dim=-1).indices
    gate_TK = torch.rand(T, k, generator=g)
    x = torch.randn(T, D, generator=g)
    out = {}
    for backend in ("native", "split"):
        ex = experts(E, D, H, backend)
        xx, gg = x.clone().requires_grad_(True), gate_TK.clone().requires_grad_(True)
        y = dispatch(xx, expert_TK, gg, ex)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        out[backend] = (y, xx.grad, gg.grad, ex.w_gate_up_EDH.grad, ex.w_down_EHD.grad)
    for a, b in zip(out["native"], out["split"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    T, D, H = 16, 4, 3
    expert_TK = torch.arange(T * k).remainder(E).view(T, k)
    assert dispatch_gradcheck(experts(E, D, H, "native", torch.float64), expert_TK, D)


# ------------------------------------------------------------------------------- the build cache


@pytest.fixture
def fake_builds(tmp_path, monkeypatch):
    """`cpp_extension.load` replaced by a fake that records each build and writes a stand-in
    library; loading a built library directly returns a stand-in module."""
    import types

    from torch.utils import cpp_extension

    builds, imports = [], []

    def fake_load(name, sources, extra_cflags, build_directory, verbose):
        builds.append({"sources": sources, "dir": build_directory})
        library = Path(build_directory) / f"{name}.so"
        library.write_bytes(b"library")
        return types.SimpleNamespace(__file__=str(library))

    def fake_import(path):
        imports.append(Path(path))
        return types.SimpleNamespace(__file__=str(path))

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(native, "_import_library", fake_import)
    monkeypatch.setenv("MOESAIC_NATIVE_DIR", str(tmp_path / "native"))
    return builds, imports


def _source(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_checkouts_with_the_same_source_share_one_build(tmp_path, monkeypatch, fake_builds):
    """Two checkouts (two source paths, same content) build once; the second loads the first's
    library. The build compiles a copy of the source inside the content-keyed directory."""
    builds, imports = fake_builds
    one = _source(tmp_path / "checkout-a" / "experts.cpp", "int kernel() { return 1; }\n")
    two = _source(tmp_path / "checkout-b" / "experts.cpp", "int kernel() { return 1; }\n")
    monkeypatch.setattr(native, "SOURCE", one)
    native._build()
    monkeypatch.setattr(native, "SOURCE", two)
    native._build()
    directory = native.build_dir()
    assert len(builds) == 1 and builds[0]["dir"] == str(directory)
    assert builds[0]["sources"] == [str(directory / "experts.cpp")]
    assert (directory / "experts.cpp").read_text() == one.read_text()
    assert imports == [directory / "moesaic_experts.so"]

    two.write_text("int kernel() { return 2; }\n")  # an edited kernel builds anew, elsewhere
    native._build()
    assert len(builds) == 2 and builds[1]["dir"] != builds[0]["dir"]
    assert Path(builds[1]["sources"][0]).read_text() == two.read_text()


def test_a_second_builder_waits_for_the_first_then_loads_its_build(
    tmp_path, monkeypatch, fake_builds
):
    """While another process holds the build lock, `_build` waits; once that builder has
    finished and released the lock, it loads that library instead of compiling again."""
    import fcntl
    import json
    import threading

    builds, imports = fake_builds
    monkeypatch.setattr(native, "SOURCE", _source(tmp_path / "src" / "experts.cpp", "int k;\n"))
    directory = native.build_dir()
    directory.mkdir(parents=True)
    other = open(directory / "build.lock", "a")  # noqa: SIM115 (the other builder's handle)
    fcntl.flock(other, fcntl.LOCK_EX)
    waiter = threading.Thread(target=native._build)
    waiter.start()
    waiter.join(timeout=1.0)
    assert waiter.is_alive(), "_build did not wait for the lock"
    (directory / "moesaic_experts.so").write_bytes(b"library")  # the other builder finishes
    (directory / native.BUILT).write_text(json.dumps({"library": "moesaic_experts.so"}))
    fcntl.flock(other, fcntl.LOCK_UN)
    other.close()
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    assert builds == [] and imports == [directory / "moesaic_experts.so"]
