// Mixtures of the fixed activation dictionary, y = sum_k w_k f_k(x): fused CPU forward/backward kernels (fp32).
//
// f: identity, relu, relu2, leaky_relu(0.01), gelu (erf), silu, tanh (afgpt/mixtures.py's DICTIONARY order).
// x is [R, C]; weights are [K, Rw, Cw] with Rw in {1, R}, Cw in {1, C}: shared, per-channel or per-row (MoA's
// token gates); codes[k] is the dictionary index of weights[k]. One pass over x forward and one over (x, grad)
// backward: per element one relu, one erfc (by one exp, plus exp(-x^2/2) backward for gelu's derivative) and
// one exp(-|x|) for both silu and tanh; relative errors below ~3e-7, also in the tails. Weight gradients are
// summed per row in float vectors and across rows in double, per thread, then over threads in a fixed order
// (deterministic for a given thread count).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kFns = 7;
enum Fn { kIdentity, kRelu, kRelu2, kLeaky, kGelu, kSilu, kTanh };
constexpr int64_t kSerialBelow = 32768;  // elements: below this, threads cost more than they save
constexpr int64_t kSharedRow = 4096;     // shared weights: x is cut into rows of this many elements
constexpr int64_t kFlushRows = 32;       // per-channel weight gradients: rows summed in float before double

enum class Layout { kShared, kPerChannel, kPerRow };

// Which functions a mixture uses and where their weights are: slot[f] = k, or -1 if f is absent.
struct Dict {
  std::array<int, kFns> slot;
  bool has(int f) const { return slot[f] >= 0; }
};

// f_k(x) (and f_k'(x) when Grad) for one vector of x; only the functions the mixture uses are evaluated.
template <bool Grad>
struct Terms {
  Vec f[kFns], d[kFns];

  Terms(Vec x, const Dict& dict) {
    const Vec zero(0.f), one(1.f);
    Vec positive = x > zero;  // all-ones lanes where x > 0
    Vec r = at::vec::maximum(x, zero);
    f[kIdentity] = x;
    f[kRelu] = r;
    f[kRelu2] = r * r;
    f[kLeaky] = Vec::blendv(x * Vec(0.01f), x, positive);
    if (Grad) {
      d[kIdentity] = one;
      d[kRelu] = one & positive;
      d[kRelu2] = r + r;
      d[kLeaky] = Vec::blendv(Vec(0.01f), one, positive);
    }
    if (dict.has(kGelu)) {
      // 1 + erf(x/sqrt2) from erfc(|x|/sqrt2), so without cancellation in the negative tail.
      Vec gauss, e = erfc_abs(x * Vec(float(M_SQRT1_2)), gauss);
      Vec cdf2 = Vec::blendv(Vec(2.f) - e, e, x < zero);  // 2 Phi(x)
      f[kGelu] = x * Vec(0.5f) * cdf2;
      if (Grad) d[kGelu] = Vec(0.5f) * cdf2 + x * gauss * Vec(float(M_SQRT1_2 * M_2_SQRTPI * 0.5));
    }
    if (dict.has(kSilu) || dict.has(kTanh)) {
      // t = exp(-|x|): sigmoid(|x|) = 1/(1+t), tanh(|x|) = (1-t^2)/(1+t^2), one division for both.
      Vec a = x.abs(), t = a.neg().exp(), t2 = t * t;
      Vec inv = one / ((one + t) * (one + t2));
      Vec sig_abs = (one + t2) * inv;
      Vec sig = Vec::blendv(sig_abs, t * sig_abs, x < zero);
      Vec sign = x & Vec(-0.f);
      // 1 - t^2 cancels for small |x|: there tanh's Taylor series to x^15 (relative error < 1e-7 below 0.5).
      Vec x2 = x * x, p(-929569.f / 638512875.f);
      for (float c : {21844.f / 6081075.f, -1382.f / 155925.f, 62.f / 2835.f, -17.f / 315.f, 2.f / 15.f,
                      -1.f / 3.f})
        p = at::vec::fmadd(p, x2, Vec(c));
      Vec th = Vec::blendv(((one - t2) * (one + t) * inv) ^ sign, at::vec::fmadd(p * x2, x, x), a < Vec(0.5f));
      f[kSilu] = x * sig;
      f[kTanh] = th;
      if (Grad) {
        d[kSilu] = sig * (one + x * (one - sig));
        d[kTanh] = one - th * th;
      }
    }
  }

  // erfc(|v|) to a relative error below 1.2e-7 (Numerical Recipes' erfcc, a Chebyshev fit) by one exp, or by
  // two when the derivative needs exp(-v^2) (gauss) too.
  static Vec erfc_abs(Vec v, Vec& gauss) {
    static constexpr float kFit[] = {0.17087277f, -0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f,
                                     -0.18628806f, 0.09678418f, 0.37409196f, 1.00002368f, -1.26551223f};
    Vec z = v.abs(), t = Vec(1.f) / at::vec::fmadd(Vec(0.5f), z, Vec(1.f));
    Vec p(kFit[0]);
    for (int i = 1; i < 10; ++i) p = at::vec::fmadd(p, t, Vec(kFit[i]));
    if (!Grad) return t * (p - z * z).exp();
    gauss = (z * z).neg().exp();
    return t * gauss * p.exp();
  }
};

// The weights of one row, per function: one weight (shared, per-row layouts) or C of them (per-channel).
struct RowWeights {
  const float* base[kFns];
  bool per_channel;
  Vec at(int f, int64_t c, int64_t m) const { return per_channel ? Vec::loadu(base[f] + c, m) : Vec(base[f][0]); }
};

struct Problem {
  Layout layout;
  int64_t rows, cols;  // the kernel's rows: C-element rows of x, or kSharedRow-element pieces for shared weights
  int64_t R, C;        // x's shape
  Dict dict;
  const float* w;

  RowWeights weights(int64_t row) const {
    RowWeights rw;
    rw.per_channel = layout == Layout::kPerChannel;
    for (int f = 0; f < kFns; ++f) {
      int k = std::max(dict.slot[f], 0);
      rw.base[f] = w + (layout == Layout::kShared ? k : layout == Layout::kPerRow ? k * R + row : k * C);
    }
    return rw;
  }
  int64_t row_begin(int64_t row) const { return row * cols; }
  int64_t row_len(int64_t row) const { return std::min(cols, R * C - row * cols); }
  int64_t grain() const { return std::max<int64_t>(1, kSerialBelow / std::max<int64_t>(cols, 1)); }
};

Problem make_problem(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef codes) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32 [R, C]");
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kFloat && w.is_contiguous(),
              "weights: contiguous fp32 [K, Rw, Cw]");
  TORCH_CHECK(int64_t(codes.size()) == w.size(0) && w.size(0) >= 1, "one code per weight");
  Problem p;
  p.R = x.size(0);
  p.C = x.size(1);
  bool per_row = w.size(1) == p.R && p.R != 1, per_channel = w.size(2) == p.C && p.C != 1;
  TORCH_CHECK((w.size(1) == 1 || per_row) && (w.size(2) == 1 || per_channel) && !(per_row && per_channel),
              "weights must be [K, 1, 1], [K, 1, C] or [K, R, 1]");
  p.layout = per_row ? Layout::kPerRow : per_channel ? Layout::kPerChannel : Layout::kShared;
  p.cols = p.layout == Layout::kShared ? kSharedRow : p.C;
  p.rows = p.cols == 0 ? 0 : (p.R * p.C + p.cols - 1) / p.cols;
  p.dict.slot.fill(-1);
  for (size_t k = 0; k < codes.size(); ++k) {
    TORCH_CHECK(codes[k] >= 0 && codes[k] < kFns && p.dict.slot[codes[k]] < 0, "codes: distinct values in [0, 7)");
    p.dict.slot[codes[k]] = int(k);
  }
  p.w = w.data_ptr<float>();
  return p;
}

// ---- forward ----

void forward_row(const float* x, float* y, int64_t n, const Dict& dict, const RowWeights& rw) {
  for (int64_t c = 0; c < n; c += Vec::size()) {
    int64_t m = std::min<int64_t>(Vec::size(), n - c);
    Terms<false> terms(Vec::loadu(x + c, m), dict);
    Vec out(0.f);
    for (int f = 0; f < kFns; ++f)
      if (dict.has(f)) out = at::vec::fmadd(rw.at(f, c, m), terms.f[f], out);
    out.store(y + c, m);
  }
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef codes) {
  Problem p = make_problem(x, w, codes);
  at::Tensor y = at::empty({p.R, p.C}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, p.rows, p.grain(), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      forward_row(xp + p.row_begin(row), yp + p.row_begin(row), p.row_len(row), p.dict, p.weights(row));
  });
  return y;
}

// ---- backward ----

// grad_x of one row; with GradW, also sum_c g*f_k into acc (per-channel: acc[f*C + c], else acc[f] lanes).
template <bool GradW, bool PerChannel>
void backward_row(const float* x, const float* g, float* gx, int64_t n, const Dict& dict, const RowWeights& rw,
                  Vec* acc, float* channel_acc, int64_t C) {
  for (int64_t c = 0; c < n; c += Vec::size()) {
    int64_t m = std::min<int64_t>(Vec::size(), n - c);
    Vec gv = Vec::loadu(g + c, m);
    Terms<true> terms(Vec::loadu(x + c, m), dict);
    Vec slope(0.f);
    for (int f = 0; f < kFns; ++f) {
      if (!dict.has(f)) continue;
      slope = at::vec::fmadd(rw.at(f, c, m), terms.d[f], slope);
      if (GradW) {
        if (PerChannel) {
          float* a = channel_acc + f * C + c;
          at::vec::fmadd(gv, terms.f[f], Vec::loadu(a, m)).store(a, m);
        } else {
          acc[f] = at::vec::fmadd(gv, terms.f[f], acc[f]);
        }
      }
    }
    (gv * slope).store(gx + c, m);
  }
}

double lane_sum(const Vec& v) {
  float lanes[Vec::size()];
  v.store(lanes);
  double s = 0;
  for (float l : lanes) s += l;
  return s;
}

template <bool GradW>
void backward_rows(const Problem& p, const float* xp, const float* gp, float* gxp, float* gwp) {
  const int nt = at::get_num_threads();
  const bool per_channel = p.layout == Layout::kPerChannel;
  // Per-thread double sums: [nt][7] (shared) or [nt][7][C] (per-channel); per-row weights need none.
  std::vector<double> sums(GradW && p.layout != Layout::kPerRow ? nt * kFns * (per_channel ? p.C : 1) : 0, 0.0);
  at::parallel_for(0, p.rows, p.grain(), [&](int64_t begin, int64_t end) {
    double* mine = sums.data() + at::get_thread_num() * kFns * (per_channel ? p.C : 1);
    std::vector<float> channel_acc(GradW && per_channel ? kFns * p.C : 0, 0.f);
    auto flush = [&] {
      for (size_t i = 0; i < channel_acc.size(); ++i) mine[i] += channel_acc[i];
      std::fill(channel_acc.begin(), channel_acc.end(), 0.f);
    };
    for (int64_t row = begin; row < end; ++row) {
      int64_t at0 = p.row_begin(row), n = p.row_len(row);
      Vec acc[kFns];
      for (Vec& a : acc) a = Vec(0.f);
      if (per_channel)
        backward_row<GradW, true>(xp + at0, gp + at0, gxp + at0, n, p.dict, p.weights(row), acc,
                                  channel_acc.data(), p.C);
      else
        backward_row<GradW, false>(xp + at0, gp + at0, gxp + at0, n, p.dict, p.weights(row), acc, nullptr, p.C);
      if (!GradW) continue;
      if (per_channel) {
        if ((row - begin + 1) % kFlushRows == 0 || row + 1 == end) flush();
      } else {
        for (int f = 0; f < kFns; ++f) {
          if (!p.dict.has(f)) continue;
          if (p.layout == Layout::kPerRow)
            gwp[p.dict.slot[f] * p.R + row] = float(lane_sum(acc[f]));
          else
            mine[f] += lane_sum(acc[f]);
        }
      }
    }
  });
  if (!GradW || p.layout == Layout::kPerRow) return;
  int64_t width = per_channel ? p.C : 1;
  for (int f = 0; f < kFns; ++f) {
    if (!p.dict.has(f)) continue;
    for (int64_t c = 0; c < width; ++c) {
      double s = 0;
      for (int t = 0; t < nt; ++t) s += sums[(t * kFns + f) * width + c];
      gwp[p.dict.slot[f] * width + c] = float(s);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w,
                                            at::IntArrayRef codes, bool weights_grad) {
  Problem p = make_problem(x, w, codes);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == at::kFloat, "grad: fp32, x's shape");
  at::Tensor g = grad.contiguous();
  at::Tensor gx = at::empty({p.R, p.C}, x.options());
  at::Tensor gw = weights_grad ? at::zeros(w.sizes(), w.options()) : at::empty({0}, w.options());
  if (weights_grad)
    backward_rows<true>(p, x.data_ptr<float>(), g.data_ptr<float>(), gx.data_ptr<float>(), gw.data_ptr<float>());
  else
    backward_rows<false>(p, x.data_ptr<float>(), g.data_ptr<float>(), gx.data_ptr<float>(), nullptr);
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY(afgpt_mixture_cpu, m) {
  m.def("forward(Tensor x, Tensor weights, int[] codes) -> Tensor");
  m.def("backward(Tensor grad, Tensor x, Tensor weights, int[] codes, bool weights_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(afgpt_mixture_cpu, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
