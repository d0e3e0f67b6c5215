// SwiGLU experts on rows sorted by expert, on CPU, one expert per thread.
//
// Each expert's rows are a contiguous chunk of x. An expert's whole forward (gate/up matmul,
// SwiGLU, down matmul) or backward runs on one thread, in an OpenMP region over the experts,
// largest first; the ATen operations inside run single-threaded there (ATen does not nest
// parallel regions). A matmul's own threads would otherwise split every small per-expert
// product and meet at a barrier after each; here they run whole experts and meet once. An
// expert with more rows than a fair share of one thread (rows · threads > all rows) runs
// outside the region with all threads, as do all experts when there are fewer than two per
// thread, so a skewed routing is never serialised onto one thread.
//
// Results do not depend on which thread ran which expert.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <vector>

namespace {

using at::Tensor;

std::vector<int64_t> row_starts(const Tensor& counts) {
  TORCH_CHECK(counts.dim() == 1 && counts.scalar_type() == at::kLong && counts.is_cpu(),
              "counts must be a 1-d int64 CPU tensor");
  auto c = counts.contiguous();
  auto* p = c.data_ptr<int64_t>();
  std::vector<int64_t> start(c.numel() + 1, 0);
  for (int64_t e = 0; e < c.numel(); e++) {
    TORCH_CHECK(p[e] >= 0, "negative expert count");
    start[e + 1] = start[e] + p[e];
  }
  return start;
}

// Calls f(e, first_row, rows) once for every expert with rows (see the file comment).
template <typename F>
void for_each_expert(const std::vector<int64_t>& start, const F& f) {
  const int64_t E = static_cast<int64_t>(start.size()) - 1, total = start[E];
  const int64_t threads = at::get_num_threads();
  auto rows = [&](int64_t e) { return start[e + 1] - start[e]; };
  std::vector<int64_t> shared;  // run in the region: largest first
  for (int64_t e = 0; e < E; e++) {
    if (rows(e) == 0) continue;
    if (threads > 1 && rows(e) * threads <= total) {
      shared.push_back(e);
    } else {
      f(e, start[e], rows(e));
    }
  }
  if (static_cast<int64_t>(shared.size()) < 2 * threads) {
    for (int64_t e : shared) f(e, start[e], rows(e));
    return;
  }
  std::stable_sort(shared.begin(), shared.end(),
                   [&](int64_t a, int64_t b) { return rows(a) > rows(b); });
  std::atomic<size_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    at::NoGradGuard no_grad;  // grad mode is per thread; workers start with it on
    for (size_t i = next++; i < shared.size(); i = next++) {
      const int64_t e = shared[i];
      f(e, start[e], rows(e));
    }
  });
}

// act · scale, in the wider of the two dtypes (scale is fp32 or wider).
Tensor scaled(const Tensor& act, const Tensor& scale) {
  const auto s = scale.unsqueeze(1);
  if (act.scalar_type() == scale.scalar_type()) return act * s;
  return (act.to(scale.scalar_type()) * s).to(act.scalar_type());
}

void check_inputs(const Tensor& x, const Tensor& w1, const Tensor& w2) {
  TORCH_CHECK(x.is_cpu() && w1.is_cpu() && w2.is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && w1.dim() == 3 && w2.dim() == 3, "x [S, D], w1 [E, D, 2H], w2 [E, H, D]");
  TORCH_CHECK(w1.size(1) == x.size(1) && w2.size(2) == x.size(1) && w1.size(2) == 2 * w2.size(1),
              "expert weight shapes do not match");
}

}  // namespace

// y = (silu(x w1_gate) · x w1_up [· scale]) w2, per expert. Returns {y [S, D], gate_up [S, 2H]}.
std::vector<Tensor> experts_forward(const Tensor& x_in, const Tensor& w1, const Tensor& w2,
                                    const Tensor& counts, const std::optional<Tensor>& scale) {
  check_inputs(x_in, w1, w2);
  const auto start = row_starts(counts);
  TORCH_CHECK(start.back() == x_in.size(0), "expert counts do not sum to the number of rows");
  const auto x = x_in.contiguous();
  const int64_t S = x.size(0), D = x.size(1), H = w2.size(1);
  auto y = at::empty({S, D}, x.options());
  auto gate_up = at::empty({S, 2 * H}, x.options());
  for_each_expert(start, [&](int64_t e, int64_t first, int64_t n) {
    auto gu = gate_up.narrow(0, first, n);
    at::mm_out(gu, x.narrow(0, first, n), w1[e]);
    auto act = at::silu(gu.narrow(1, 0, H)).mul_(gu.narrow(1, H, H));
    if (scale) act = scaled(act, scale->narrow(0, first, n));
    auto y_e = y.narrow(0, first, n);
    at::mm_out(y_e, act, w2[e]);
  });
  return {y, gate_up};
}

// Gradients of experts_forward: {dx, dw1, dw2, dscale (undefined without scale)}.
std::vector<Tensor> experts_backward(const Tensor& dy_in, const Tensor& x_in, const Tensor& w1,
                                     const Tensor& w2, const Tensor& counts,
                                     const std::optional<Tensor>& scale, const Tensor& gate_up) {
  check_inputs(x_in, w1, w2);
  const auto start = row_starts(counts);
  const auto x = x_in.contiguous(), dy = dy_in.contiguous();
  const int64_t S = x.size(0), H = w2.size(1);
  auto dx = at::empty_like(x);
  auto dw1 = at::zeros_like(w1);  // experts without rows get zero gradients
  auto dw2 = at::zeros_like(w2);
  auto dgate_up = at::empty({S, 2 * H}, x.options());
  Tensor dscale;
  if (scale) dscale = at::empty({S}, scale->options());
  for_each_expert(start, [&](int64_t e, int64_t first, int64_t n) {
    const auto gu = gate_up.narrow(0, first, n);
    const auto gate = gu.narrow(1, 0, H), up = gu.narrow(1, H, H);
    const auto x_e = x.narrow(0, first, n), dy_e = dy.narrow(0, first, n);
    const auto silu = at::silu(gate);
    const auto act = silu * up;
    auto dact = at::mm(dy_e, w2[e].t());
    auto dw2_e = dw2[e], dw1_e = dw1[e], dx_e = dx.narrow(0, first, n);
    if (scale) {
      const auto s = scale->narrow(0, first, n);
      const auto wide = scale->scalar_type();
      auto ds = dscale.narrow(0, first, n);
      at::sum_out(ds, dact.to(wide) * act.to(wide), {1});
      at::mm_out(dw2_e, scaled(act, s).t(), dy_e);
      dact = scaled(dact, s);
    } else {
      at::mm_out(dw2_e, act.t(), dy_e);
    }
    auto dgu = dgate_up.narrow(0, first, n);
    auto dgate = dgu.narrow(1, 0, H), dup = dgu.narrow(1, H, H);
    at::mul_out(dup, dact, silu);
    at::silu_backward_out(dgate, dact * up, gate);
    at::mm_out(dx_e, dgu, w1[e].t());
    at::mm_out(dw1_e, x_e.t(), dgu);
  });
  return {dx, dw1, dw2, dscale};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("experts_forward", &experts_forward, py::call_guard<py::gil_scoped_release>());
  m.def("experts_backward", &experts_backward, py::call_guard<py::gil_scoped_release>());
}
