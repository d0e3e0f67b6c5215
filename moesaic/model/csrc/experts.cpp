// SwiGLU experts on rows sorted by expert, on CPU, one expert per thread.
//
// Each expert's rows are a contiguous chunk of the sorted rows. An expert's whole forward
// (gate/up matmul, SwiGLU, down matmul) or backward runs on one thread, in an OpenMP region
// over the experts, largest first; the ATen operations inside run single-threaded there (ATen
// does not nest parallel regions). A matmul's own threads would otherwise split every small
// per-expert product and meet at a barrier after each; here they run whole experts and meet
// once. An expert with more rows than a fair share of one thread (rows · threads > all rows)
// runs outside the region with all threads, as do all experts when there are fewer than two per
// thread, so a skewed routing is never serialised onto one thread.
//
// Inputs may be given in token order with `rows` (the token of each sorted row): each expert
// then copies its own rows into a small buffer that stays in cache, instead of the caller
// writing and re-reading a gathered [S, D] copy (S = tokens · k), which costs memory traffic
// k times the size of the input.
//
// Results do not depend on which thread ran which expert.
//
// In fp32 and fp64 the SwiGLU part of the backward is one pass over each expert's rows after one
// sigmoid (`swiglu_backward`), instead of five elementwise ATen operations and two exponentials.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cstring>
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

// The SwiGLU part of one expert's backward in fp32 or fp64, in one pass over its rows after one
// sigmoid: from gate_up [n, 2H] and the activation gradient dact [n, H], writes dgate_up and,
// with a row scale, dscale = Σ_h dact · silu(gate) · up; returns the activation the down
// projection saw, silu(gate) · up [· scale], for its weight gradient.
Tensor swiglu_backward(const Tensor& gate_up, const Tensor& dact, const std::optional<Tensor>& scale,
                       Tensor& dgate_up, std::optional<Tensor>& dscale) {
  const int64_t n = gate_up.size(0), H = gate_up.size(1) / 2;
  const auto sig = at::sigmoid(gate_up.narrow(1, 0, H)).contiguous();
  auto act = at::empty({n, H}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES(gate_up.scalar_type(), "swiglu_backward", [&] {
    const auto* gu = gate_up.data_ptr<scalar_t>();
    const auto* da = dact.data_ptr<scalar_t>();
    const auto* sg = sig.data_ptr<scalar_t>();
    auto* out = act.data_ptr<scalar_t>();
    auto* dgu = dgate_up.data_ptr<scalar_t>();
    const int64_t ld = gate_up.stride(0);
    for (int64_t i = 0; i < n; i++) {
      const scalar_t *g = gu + i * ld, *u = g + H, *d = da + i * H, *p = sg + i * H;
      scalar_t* a = out + i * H;
      scalar_t *dg = dgu + i * 2 * H, *dup = dg + H;
      scalar_t s = 1;
      if (scale) {
        s = scale->data_ptr<scalar_t>()[i];
        scalar_t sum = 0;
        for (int64_t h = 0; h < H; h++) sum += d[h] * (g[h] * p[h] * u[h]);
        dscale->data_ptr<scalar_t>()[i] = sum;
      }
      for (int64_t h = 0; h < H; h++) {
        const scalar_t silu = g[h] * p[h], ds = d[h] * s;
        a[h] = silu * u[h] * s;
        dup[h] = ds * silu;
        dg[h] = ds * u[h] * p[h] * (1 + g[h] * (1 - p[h]));
      }
    }
  });
  return act;
}

void check_inputs(const Tensor& x, const Tensor& w1, const Tensor& w2) {
  TORCH_CHECK(x.is_cpu() && w1.is_cpu() && w2.is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && w1.dim() == 3 && w2.dim() == 3, "x [S, D], w1 [E, D, 2H], w2 [E, H, D]");
  TORCH_CHECK(w1.size(1) == x.size(1) && w2.size(2) == x.size(1) && w1.size(2) == 2 * w2.size(1),
              "expert weight shapes do not match");
  TORCH_CHECK(w2.scalar_type() == w1.scalar_type(), "expert weights must share one dtype");
}

// The number of sorted rows S of `src`: [S, D] already in expert order, or [T, D] in token order
// with `rows` [S], the token of each sorted row (checked to be in range).
int64_t sorted_row_count(const Tensor& src, const std::optional<Tensor>& rows) {
  if (!rows) return src.size(0);
  TORCH_CHECK(rows->dim() == 1 && rows->scalar_type() == at::kLong && rows->is_cpu() &&
                  rows->is_contiguous(),
              "rows must be a contiguous 1-d int64 CPU tensor");
  if (rows->numel() > 0) {
    const auto lo = rows->min().item<int64_t>(), hi = rows->max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < src.size(0), "row index out of range");
  }
  return rows->size(0);
}

// Rows first..first+n of the sorted order as a contiguous [n, D] tensor of `dtype`: a view of
// src when it is already sorted and of that dtype, else copied row by row from token order.
Tensor sorted_rows(const Tensor& src, const std::optional<Tensor>& rows, int64_t first, int64_t n,
                   at::ScalarType dtype) {
  if (!rows) return src.narrow(0, first, n).to(dtype);
  if (src.scalar_type() != dtype) {
    return at::index_select(src, 0, rows->narrow(0, first, n)).to(dtype);
  }
  const int64_t bytes = src.size(1) * src.element_size();
  auto out = at::empty({n, src.size(1)}, src.options());
  const auto* token = rows->data_ptr<int64_t>() + first;
  const auto* from = static_cast<const char*>(src.data_ptr());
  auto* to = static_cast<char*>(out.data_ptr());
  for (int64_t i = 0; i < n; i++) std::memcpy(to + i * bytes, from + token[i] * bytes, bytes);
  return out;
}

}  // namespace

// y = (silu(x w1_gate) · x w1_up [· scale]) w2, per expert, in the weights' dtype. x is [S, D]
// sorted by expert, or [T, D] in token order with `rows`. Returns {y [S, D], gate_up [S, 2H]}.
std::vector<Tensor> experts_forward(const Tensor& x_in, const Tensor& w1, const Tensor& w2,
                                    const Tensor& counts, const std::optional<Tensor>& scale,
                                    const std::optional<Tensor>& rows) {
  check_inputs(x_in, w1, w2);
  const auto start = row_starts(counts);
  const auto x = x_in.contiguous();
  const int64_t S = sorted_row_count(x, rows), D = x.size(1), H = w2.size(1);
  TORCH_CHECK(start.back() == S, "expert counts do not sum to the number of rows");
  const auto dtype = w1.scalar_type();
  const auto options = x.options().dtype(dtype);
  auto y = at::empty({S, D}, options);
  auto gate_up = at::empty({S, 2 * H}, options);
  for_each_expert(start, [&](int64_t e, int64_t first, int64_t n) {
    auto gu = gate_up.narrow(0, first, n);
    at::mm_out(gu, sorted_rows(x, rows, first, n, dtype), w1[e]);
    auto act = at::silu(gu.narrow(1, 0, H)).mul_(gu.narrow(1, H, H));
    if (scale) act = scaled(act, scale->narrow(0, first, n));
    auto y_e = y.narrow(0, first, n);
    at::mm_out(y_e, act, w2[e]);
  });
  return {y, gate_up};
}

// Gradients of experts_forward: {dx [S, D] sorted, in the weights' dtype, dw1, dw2, dscale
// (undefined without scale)}. x and dy are each sorted [S, D], or in token order with `x_rows`
// / `dy_rows`.
std::vector<Tensor> experts_backward(const Tensor& dy_in, const Tensor& x_in, const Tensor& w1,
                                     const Tensor& w2, const Tensor& counts,
                                     const std::optional<Tensor>& scale, const Tensor& gate_up,
                                     const std::optional<Tensor>& x_rows,
                                     const std::optional<Tensor>& dy_rows) {
  check_inputs(x_in, w1, w2);
  const auto start = row_starts(counts);
  const auto x = x_in.contiguous(), dy = dy_in.contiguous();
  const int64_t S = gate_up.size(0), H = w2.size(1);
  const bool same_rows = x_rows && dy_rows && x_rows->is_same(*dy_rows) && dy.size(0) == x.size(0);
  TORCH_CHECK(start.back() == S && sorted_row_count(x, x_rows) == S &&
                  (same_rows || sorted_row_count(dy, dy_rows) == S) && dy.dim() == 2 &&
                  dy.size(1) == x.size(1),
              "expert counts, inputs and gradients disagree on the number of rows");
  const auto dtype = w1.scalar_type();
  auto dx = at::empty({S, x.size(1)}, x.options().dtype(dtype));
  // Each expert with rows writes its own weight gradients; only the others need zeros.
  auto dw1 = at::empty_like(w1), dw2 = at::empty_like(w2);
  for (int64_t e = 0; e + 1 < static_cast<int64_t>(start.size()); e++) {
    if (start[e + 1] == start[e]) {
      dw1[e].zero_();
      dw2[e].zero_();
    }
  }
  Tensor dscale;
  if (scale) dscale = at::empty({S}, scale->options());
  // fp32/fp64 with a row scale of the same dtype take the one-pass SwiGLU backward
  const bool fused = (dtype == at::kFloat || dtype == at::kDouble) && gate_up.stride(1) == 1 &&
                     (!scale || (scale->scalar_type() == dtype && scale->stride(0) == 1));
  for_each_expert(start, [&](int64_t e, int64_t first, int64_t n) {
    const auto gu = gate_up.narrow(0, first, n);
    const auto x_e = sorted_rows(x, x_rows, first, n, dtype);
    const auto dy_e = sorted_rows(dy, dy_rows, first, n, dtype);
    auto dact = at::mm(dy_e, w2[e].t());
    auto dw2_e = dw2[e], dw1_e = dw1[e], dx_e = dx.narrow(0, first, n);
    auto dgu = at::empty({n, 2 * H}, gate_up.options());  // per expert: stays in cache
    if (fused) {
      const auto s = scale ? std::optional<Tensor>(scale->narrow(0, first, n)) : std::nullopt;
      auto ds = scale ? std::optional<Tensor>(dscale.narrow(0, first, n)) : std::nullopt;
      const auto act = swiglu_backward(gu, dact, s, dgu, ds);
      at::mm_out(dw2_e, act.t(), dy_e);
      at::mm_out(dx_e, dgu, w1[e].t());
      at::mm_out(dw1_e, x_e.t(), dgu);
      return;
    }
    const auto gate = gu.narrow(1, 0, H), up = gu.narrow(1, H, H);
    const auto silu = at::silu(gate);
    const auto act = silu * up;
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
    auto dgate = dgu.narrow(1, 0, H), dup = dgu.narrow(1, H, H);
    at::mul_out(dup, dact, silu);
    at::silu_backward_out(dgate, dact * up, gate);
    at::mm_out(dx_e, dgu, w1[e].t());
    at::mm_out(dw1_e, x_e.t(), dgu);
  });
  return {dx, dw1, dw2, dscale};
}

// A stable counting sort of the flattened assignments [T, k] by expert id (E buckets, one pass
// each way): {order, token, inverse, counts, expert_sorted}, the same as a stable argsort.
std::vector<Tensor> sort_by_expert(const Tensor& expert_in, int64_t num_experts) {
  TORCH_CHECK(expert_in.dim() == 2 && expert_in.scalar_type() == at::kLong && expert_in.is_cpu(),
              "expert ids must be a [T, k] int64 CPU tensor");
  const auto expert = expert_in.contiguous();
  const int64_t S = expert.numel(), k = std::max<int64_t>(expert.size(1), 1);
  const auto* id = expert.data_ptr<int64_t>();
  const auto options = expert.options();
  auto counts = at::zeros({num_experts}, options);
  auto* count = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < S; i++) {
    TORCH_CHECK(id[i] >= 0 && id[i] < num_experts, "expert id ", id[i], " out of range");
    count[id[i]]++;
  }
  std::vector<int64_t> next(num_experts, 0);
  for (int64_t e = 1; e < num_experts; e++) next[e] = next[e - 1] + count[e - 1];
  auto order = at::empty({S}, options), token = at::empty({S}, options);
  auto inverse = at::empty({S}, options), sorted = at::empty({S}, options);
  auto *o = order.data_ptr<int64_t>(), *t = token.data_ptr<int64_t>();
  auto *inv = inverse.data_ptr<int64_t>(), *srt = sorted.data_ptr<int64_t>();
  for (int64_t i = 0; i < S; i++) {
    const int64_t r = next[id[i]]++;
    o[r] = i;
    t[r] = i / k;
    inv[i] = r;
    srt[r] = id[i];
  }
  return {order, token, inverse, counts, sorted};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("experts_forward", &experts_forward, py::arg("x"), py::arg("w1"), py::arg("w2"),
        py::arg("counts"), py::arg("scale") = py::none(), py::arg("rows") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("experts_backward", &experts_backward, py::arg("dy"), py::arg("x"), py::arg("w1"),
        py::arg("w2"), py::arg("counts"), py::arg("scale"), py::arg("gate_up"),
        py::arg("x_rows") = py::none(), py::arg("dy_rows") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("sort_by_expert", &sort_by_expert, py::call_guard<py::gil_scoped_release>());
}
