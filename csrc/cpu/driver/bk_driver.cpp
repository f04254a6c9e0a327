// Torch-free driver of the BK-Core CPU kernels: times forward and backward of the three
// instruction-set builds (bk_core_cpu.h's isa_base / isa_avx2 / isa_avx512) on random inputs, and
// checks them: every forward against a scalar complex<double> recursion, every ISA's outputs
// against isa_base's. Built by build.sh with the flags setup.py uses; see README.md.
//
//   bk_driver [--reps R] [--threads T] [SPEC ...]      SPEC = B,N[,f32|f64][,two|causal][,ISA]
//   ISA = base|avx2|avx512|all; defaults: 64,4096,f32,two,all; R = 50; T = hardware threads.
//
// Inputs: a = -2 + U(-0.1, 0.1) (B, N), one shared coupling row k = 1 (a Laplacian), z = 0.1 + 1i,
// no mask; upstream gradient U(-1, 1). The backward is timed twice: "bwd" wants grad a only (the
// usual case of a fixed Laplacian and a Python z), "bwd_full" also grad k (per row) and grad z.
// A causal backward reads the forward's output (Grads::out), as the torch op does without a mask.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <complex>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../bk_core_cpu.h"

namespace {

// ---- thread pool: Par::parallel_for split as at::parallel_for splits it (grain 1, OpenMP static)

// Workers spin briefly for the next job, then sleep on a condition variable (a busy machine must
// not leave a spinning thread waiting for one that is not scheduled).
class Pool {
 public:
  explicit Pool(int n) : n_(std::max(1, n)) {
    for (int i = 1; i < n_; ++i) threads_.emplace_back([this, i] { worker(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      gen_.fetch_add(1, std::memory_order_acq_rel);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int size() const { return n_; }
  void run(int64_t n, void* ctx, void (*fn)(void*, int64_t, int64_t)) {
    if (n <= 0) return;
    nt_ = int(std::min<int64_t>(n_, n));
    chunk_ = (n + nt_ - 1) / nt_;
    total_ = n;
    ctx_ = ctx;
    fn_ = fn;
    pending_.store(nt_ - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen_.fetch_add(1, std::memory_order_acq_rel);
    }
    cv_.notify_all();
    part(0);
    wait_for([&] { return pending_.load(std::memory_order_acquire) == 0; }, done_cv_);
  }
  static void parallel_for(int64_t n, void* ctx, void (*fn)(void*, int64_t, int64_t)) { self->run(n, ctx, fn); }
  static Pool* self;

 private:
  template <class P>
  void wait_for(P&& ready, std::condition_variable& cv) {
    for (int i = 0; i < 20000; ++i) {
      if (ready()) return;
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    }
    std::unique_lock<std::mutex> lk(mu_);
    cv.wait(lk, ready);
  }
  void part(int i) {
    const int64_t b = int64_t(i) * chunk_, e = std::min(total_, b + chunk_);
    if (b < e) fn_(ctx_, b, e);
  }
  void worker(int i) {
    uint64_t seen = 0;
    for (;;) {
      wait_for([&] { return gen_.load(std::memory_order_acquire) != seen; }, cv_);
      seen = gen_.load(std::memory_order_acquire);
      if (stop_) return;
      if (i < nt_) {
        part(i);
        if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
          std::lock_guard<std::mutex> lk(mu_);
          done_cv_.notify_all();
        }
      }
    }
  }
  int n_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> pending_{0};
  bool stop_ = false;
  int nt_ = 1;
  int64_t chunk_ = 0, total_ = 0;
  void* ctx_ = nullptr;
  void (*fn_)(void*, int64_t, int64_t) = nullptr;
};
Pool* Pool::self = nullptr;

// ---- configuration

enum Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaName[] = {"base", "avx2", "avx512"};

bool cpu_has(Isa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return true;
#else
  return isa == kBase;  // the wide builds are empty off x86-64
#endif
}

struct Spec {
  int64_t B = 64, N = 4096;
  bool f64 = false, causal = false;
  int isa = -1;  // -1: all
};

[[noreturn]] void usage(const char* msg) {
  std::fprintf(stderr,
               "bk_driver: %s\nusage: bk_driver [--reps R] [--threads T] [B,N[,f32|f64][,two|causal][,base|avx2|"
               "avx512|all] ...]\n",
               msg);
  std::exit(2);
}

Spec parse_spec(const std::string& s) {
  Spec sp;
  std::vector<std::string> f;
  size_t p = 0;
  for (;;) {
    size_t q = s.find(',', p);
    f.push_back(s.substr(p, q == std::string::npos ? std::string::npos : q - p));
    if (q == std::string::npos) break;
    p = q + 1;
  }
  if (f.size() < 2) usage(("expected B,N[,...], got '" + s + "'").c_str());
  char* end = nullptr;
  sp.B = std::strtoll(f[0].c_str(), &end, 10);
  if (*end || sp.B < 1) usage(("B: expected a positive integer, got '" + f[0] + "'").c_str());
  sp.N = std::strtoll(f[1].c_str(), &end, 10);
  if (*end || sp.N < 1) usage(("N: expected a positive integer, got '" + f[1] + "'").c_str());
  for (size_t i = 2; i < f.size(); ++i) {
    const std::string& x = f[i];
    if (x == "f32" || x == "float32") sp.f64 = false;
    else if (x == "f64" || x == "float64") sp.f64 = true;
    else if (x == "two" || x == "two-sided") sp.causal = false;
    else if (x == "causal") sp.causal = true;
    else if (x == "all") sp.isa = -1;
    else if (x == "base") sp.isa = kBase;
    else if (x == "avx2") sp.isa = kAvx2;
    else if (x == "avx512") sp.isa = kAvx512;
    else usage(("unknown field '" + x + "' in '" + s + "'").c_str());
  }
  return sp;
}

// ---- kernels of one ISA

template <class T>
void forward(int isa, const bk_cpu::Problem<T>& p, T* out, const bk_cpu::Par& par) {
  if (isa == kAvx512) bk_cpu::isa_avx512::forward(p, out, par);
  else if (isa == kAvx2) bk_cpu::isa_avx2::forward(p, out, par);
  else bk_cpu::isa_base::forward(p, out, par);
}
template <class T>
void backward(int isa, const bk_cpu::Problem<T>& p, bk_cpu::Grads<T>& g, const bk_cpu::Par& par) {
  if (isa == kAvx512) bk_cpu::isa_avx512::backward(p, g, par);
  else if (isa == kAvx2) bk_cpu::isa_avx2::backward(p, g, par);
  else bk_cpu::isa_base::backward(p, g, par);
}

template <class F>
double median_us(int reps, F&& f) {
  for (int i = 0; i < std::max(2, reps / 10); ++i) f();  // warm-up (scratch, page faults, clocks)
  std::vector<double> t(reps);
  for (int i = 0; i < reps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    t[i] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  }
  std::nth_element(t.begin(), t.begin() + reps / 2, t.end());
  return t[reps / 2];
}

// max_i |x_i - r_i| / max(|r_i|, floor): elementwise relative, floor = 1e-6 max |r| (the forward)
template <class T>
double max_rel(const std::vector<T>& x, const std::vector<T>& r) {
  double big = 0, worst = 0;
  for (T v : r) big = std::max(big, std::fabs(double(v)));
  const double floor = std::max(1e-300, 1e-6 * big);
  for (size_t i = 0; i < x.size(); ++i) {
    const double d = std::fabs(double(x[i]) - double(r[i]));
    worst = std::max(worst, std::isnan(d) ? INFINITY : d / std::max(std::fabs(double(r[i])), floor));
  }
  return worst;
}

// max_i |x_i - r_i| / max_i |r_i|: normwise relative (the gradients, whose sums cancel)
double norm_rel(const std::vector<double>& x, const std::vector<double>& r) {
  double big = 0, worst = 0;
  for (double v : r) big = std::max(big, std::fabs(v));
  for (size_t i = 0; i < x.size(); ++i) {
    const double d = std::fabs(x[i] - r[i]);
    worst = std::max(worst, std::isnan(d) ? INFINITY : d);
  }
  return worst / std::max(big, 1e-300);
}

// The forward in scalar complex<double>: d_i = alpha_i - k_{i-1} / d_{i-1} left to right,
// e_i = alpha_i - k_i / e_{i+1} right to left, G_ii = 1 / (d_i + e_i - alpha_i); causal 1 / d_i.
template <class T>
std::vector<T> scalar_forward(const bk_cpu::Problem<T>& p) {
  typedef std::complex<double> C;
  const int64_t N = p.N;
  std::vector<T> out(static_cast<size_t>(p.B * N * 2));
  std::vector<C> d(N), e(N);
  const C z(p.zr, p.zi);
  for (int64_t b = 0; b < p.B; ++b) {
    const T* a = p.a + b * N;
    const T* k = p.k + b * p.k_row_stride;
    for (int64_t i = 0; i < N; ++i) d[i] = (double(a[i]) - z) - (i > 0 ? double(k[i - 1]) / d[i - 1] : C(0));
    for (int64_t i = N - 1; i >= 0; --i) e[i] = (double(a[i]) - z) - (i + 1 < N ? double(k[i]) / e[i + 1] : C(0));
    for (int64_t i = 0; i < N; ++i) {
      const C g = p.causal ? 1.0 / d[i] : 1.0 / (d[i] + e[i] - (double(a[i]) - z));
      out[2 * (b * N + i)] = T(g.real());
      out[2 * (b * N + i) + 1] = T(g.imag());
    }
  }
  return out;
}

struct Outputs {
  std::vector<double> fwd, ga, gk, gz;  // as double, to compare across dtypes' builds uniformly
};

template <class T>
void run_spec(const Spec& sp, int isa_sel, int reps, const bk_cpu::Par& par, std::vector<Outputs>& ref) {
  const int64_t B = sp.B, N = sp.N, BN = B * N;
  std::mt19937_64 rng(12345);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::vector<T> a(static_cast<size_t>(BN)), grad(static_cast<size_t>(2 * BN));
  std::vector<T> k(static_cast<size_t>(std::max<int64_t>(N - 1, 1)), T(1));
  for (auto& x : a) x = T(-2.0 + 0.1 * u(rng));
  for (auto& x : grad) x = T(u(rng));
  bk_cpu::Problem<T> p{a.data(), k.data(), 0, nullptr, B, N, T(0.1), T(1.0), sp.causal};
  const std::vector<T> sref = scalar_forward(p);

  std::vector<T> out(static_cast<size_t>(2 * BN)), ga(static_cast<size_t>(BN));
  std::vector<T> gk(static_cast<size_t>(B * std::max<int64_t>(N - 1, 1)));
  bk_cpu::Grads<T> lean{grad.data(), ga.data(), nullptr, nullptr, {0, 0}, false, sp.causal ? out.data() : nullptr};
  bk_cpu::Grads<T> full{grad.data(), ga.data(), N > 1 ? gk.data() : nullptr, nullptr, {0, 0}, true,
                        sp.causal ? out.data() : nullptr};

  for (int isa = kBase; isa <= kAvx512; ++isa) {
    if (isa_sel >= 0 && isa != isa_sel && isa != kBase) continue;
    const bool timed = isa_sel < 0 || isa == isa_sel;
    if (!cpu_has(Isa(isa))) {
      std::printf("%-7s %-4s %-7s %6lld %7lld  skipped: the CPU lacks this instruction set\n", kIsaName[isa],
                  sp.f64 ? "f64" : "f32", sp.causal ? "causal" : "two", (long long)B, (long long)N);
      continue;
    }
    // outputs for the checks (one call each), then the timings
    Outputs o;
    forward<T>(isa, p, out.data(), par);
    o.fwd.assign(out.begin(), out.end());
    const double err_ref = max_rel(out, sref);
    backward<T>(isa, p, full, par);
    o.ga.assign(ga.begin(), ga.end());
    if (N > 1) o.gk.assign(gk.begin(), gk.end());
    o.gz = {full.grad_z[0], full.grad_z[1]};
    if (isa == kBase) ref.assign(1, o);
    if (!timed) continue;
    const Outputs& r = ref[0];
    const double dfwd = max_rel(o.fwd, r.fwd);
    const double dbwd = std::max({norm_rel(o.ga, r.ga), norm_rel(o.gk, r.gk), norm_rel(o.gz, r.gz)});
    const double tf = median_us(reps, [&] { forward<T>(isa, p, out.data(), par); });
    const double tb = median_us(reps, [&] { backward<T>(isa, p, lean, par); });
    const double tbf = median_us(reps, [&] { backward<T>(isa, p, full, par); });
    const double el = double(BN) * 1e-3;  // us -> ns per element
    std::printf("%-7s %-4s %-7s %6lld %7lld %10.1f %8.3f %10.1f %8.3f %10.1f %8.3f %10.2e %10.2e %10.2e\n",
                kIsaName[isa], sp.f64 ? "f64" : "f32", sp.causal ? "causal" : "two", (long long)B, (long long)N, tf,
                tf / el, tb, tb / el, tbf, tbf / el, err_ref, dfwd, dbwd);
    std::fflush(stdout);
  }
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 50;
  int threads = int(std::max(1u, std::thread::hardware_concurrency()));
  std::vector<Spec> specs;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    if ((s == "--reps" || s == "--threads") && i + 1 < argc) {
      const int v = std::atoi(argv[++i]);
      if (v < 1) usage((s + ": expected a positive integer").c_str());
      (s == "--reps" ? reps : threads) = v;
    } else if (s == "-h" || s == "--help") {
      usage("torch-free timing and consistency check of the BK-Core CPU kernels");
    } else {
      specs.push_back(parse_spec(s));
    }
  }
  if (specs.empty()) specs.push_back(Spec{});
  Pool pool(threads);
  Pool::self = &pool;
  const bk_cpu::Par par{&Pool::parallel_for, pool.size()};
  std::printf("# threads %d, reps %d (median); times in us and ns per element (B * N); err_ref: forward vs a "
              "scalar complex<double> recursion, d_base_f: vs isa_base (both elementwise relative); d_base_b: vs "
              "isa_base, max over grad a, grad k, grad z of max |difference| / max |isa_base's|\n",
              pool.size(), reps);
  std::printf("%-7s %-4s %-7s %6s %7s %10s %8s %10s %8s %10s %8s %10s %10s %10s\n", "isa", "dt", "mode", "B", "N",
              "fwd_us", "fwd_ns", "bwd_us", "bwd_ns", "bwdfull_us", "full_ns", "err_ref", "d_base_f", "d_base_b");
  for (const Spec& sp : specs) {
    std::vector<Outputs> ref;
    if (sp.f64)
      run_spec<double>(sp, sp.isa, reps, par, ref);
    else
      run_spec<float>(sp, sp.isa, reps, par, ref);
  }
  return 0;
}
