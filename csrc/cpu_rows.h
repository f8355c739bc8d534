// The row kernels of the CPU forward and backward passes, written once and compiled once per
// CPU capability (see cpu_kernels.h).
//
// No include guard on purpose: csrc/cpu_kernels.cpp includes this file inside a different
// namespace each time (on x86-64 under a different target), so each copy is a distinct set of
// functions (no ODR clash between copies compiled for different instruction sets). The includer
// declares `kLanes` in that namespace first: the float32 lanes of one vector register of the
// copy's instruction set, 16 (a zmm register, AVX-512), 8 (a ymm, AVX2) or 4 (an xmm of the
// x86-64 baseline, SSE2; a NEON register on aarch64, whose baseline includes NEON). The code
// uses GCC vector extensions, which clang implements too, of exactly that width: GCC lowers a
// vector type wider than the target's registers to scalar code for its comparisons and selects
// (vexp's selects), which made copies with 16 lanes on AVX2 and SSE2 slower than plain loops.
//
// What the two row kernels compute is docs/method.md (the token log-probabilities, and the
// gradient with respect to the logits); their contract is RowKernels in cpu_kernels.h.

typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint32_t vuint __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef uint16_t vushort __attribute__((vector_size(kLanes * sizeof(uint16_t))));  // bf16 bits
// Rows are processed in blocks that stay in L1: the block's max first, then its exps from L1,
// so that each element is read from memory once and exponentiated once.
constexpr int64_t kBlock = 1024;
// Independent accumulators in the block loops (kAcc vectors a step), so that a block's max and
// its sum are not one chain of dependent instructions, each waiting for the previous one.
constexpr int kAcc = 4;
// The loops that stream a row from memory (a block's max, the gradient) ask for the data this
// many bytes ahead of where they read: with narrower vectors (AVX2, SSE2) the hardware
// prefetcher alone fell behind, above all when the gradient is written over the logits.
constexpr uintptr_t kPrefetchBytes = 4096;

// A hint to fetch the cache line kPrefetchBytes past p into the cache. The address may lie past
// the row's end, so it is formed as an integer: a prefetch never faults, and nothing reads it.
[[gnu::always_inline]] static inline void prefetch_ahead(const void* p) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + kPrefetchBytes));
}

[[gnu::always_inline]] static inline vfloat vsplat(float x) { return vfloat{} + x; }
[[gnu::always_inline]] static inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }

// exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (Cody-Waite
// split of ln 2 so that r is exact), exp(r) by its degree-6 Taylor polynomial (error < 2 ulp).
// For x <= 88 (2^n with n <= 127), -inf and NaN; x - max and x - lse, the kernels' arguments,
// are <= 0. Below log(FLT_MIN) the result is flushed to 0 by the last select, which also
// drops whatever the steps before made of such an x (-inf gives NaN there; the integer steps
// are unsigned, so they wrap). NaN gives NaN: every step keeps it and `x < lo` is false for
// it; exp(+inf - +inf) = exp(NaN) is how a +inf logit makes its row's lse NaN, as in
// torch.log_softmax. No clamp of x into range first: a clamp that keeps NaN is a compare and a
// blend, and on AVX2, whose blend is several micro-ops on Intel cores, the two clamps and the
// select cost about as much as the polynomial.
// Inlined everywhere: a call would pass its vectors through memory.
[[gnu::always_inline]] static inline vfloat vexp_upto88(vfloat x) {
  const vfloat lo = vsplat(-87.33f);
  const vfloat magic = vsplat(12582912.0f);                 // 1.5 * 2^23: rounds to integer
  const vfloat t = x * vsplat(1.44269504f) + magic;
  const vfloat n = t - magic;
  const vfloat r = (x - n * vsplat(0.693359375f)) - n * vsplat(-2.12194440e-4f);
  vfloat p = vsplat(1.0f / 720.0f);
  p = p * r + vsplat(1.0f / 120.0f);
  p = p * r + vsplat(1.0f / 24.0f);
  p = p * r + vsplat(1.0f / 6.0f);
  p = p * r + vsplat(0.5f);
  p = p * r + vsplat(1.0f);
  p = p * r + vsplat(1.0f);
  // 2^n: n + 127 in the exponent field (t's low mantissa bits hold n + 0x400000).
  const vuint scale_bits = (((vuint)t - (vuint)magic) + 127u) << 23;
  const vfloat y = p * (vfloat)scale_bits;
  return x < lo ? vfloat{} : y;
}

// exp(x) for every x: as vexp_upto88, and +inf above 88.37, where 2^n would overflow (exp(x)
// itself overflows float32 from 88.72 on). For the backward pass, whose lse comes from outside
// the kernel; the forward pass's own x - max never needs it.
[[gnu::always_inline]] static inline vfloat vexp(vfloat x) {
  return x > vsplat(88.37f) ? vsplat(INFINITY) : vexp_upto88(x);
}

static inline float hmax(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

static inline double hsum(vfloat v) {
  double s = 0.0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// Loads and stores of kLanes elements, converting to and from float32.
[[gnu::always_inline]] static inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
[[gnu::always_inline]] static inline vfloat vload(const c10::BFloat16* p) {
  // bf16 is the top half of a float32.
  vushort h;
  std::memcpy(&h, p, sizeof(h));
  return (vfloat)(__builtin_convertvector(h, vuint) << 16);
}
[[gnu::always_inline]] static inline vfloat vload(const c10::Half* p) {
  vfloat v;
  for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}
[[gnu::always_inline]] static inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
[[gnu::always_inline]] static inline void vstore(c10::BFloat16* p, vfloat v) {
  // Round to nearest even, as c10::BFloat16 does; NaN stays a (quiet) NaN.
  const vuint u = (vuint)v;
  const vuint rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const vuint bits = (u & 0x7fffffffu) > 0x7f800000u ? vuint{} + 0x7fc0u : rounded;
  const vushort h = __builtin_convertvector(bits, vushort);
  std::memcpy(p, &h, sizeof(h));
}
[[gnu::always_inline]] static inline void vstore(c10::Half* p, vfloat v) {
  for (int i = 0; i < kLanes; ++i) p[i] = c10::Half(v[i]);
}

// The first n < kLanes elements at p as a vector whose other lanes are `fill`, and the first
// n lanes of v stored at p; the same float32 conversions and rounding as vload / vstore.
template <typename T>
[[gnu::always_inline]] static inline vfloat load_part(const T* p, int64_t n, float fill) {
  vfloat v = vsplat(fill);
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}
template <typename T>
[[gnu::always_inline]] static inline void store_part(T* p, vfloat v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(v[i]);
}

// Raises the running max m to a block's max bm, rescaling the running sum of exp(x - m) to the
// new max; returns the offset for the block's exps: m, or 0 while m is -inf (x - (-inf) would
// turn every -inf into NaN).
[[gnu::always_inline]] static inline vfloat raise_max(float bm, float& m, double& sum) {
  if (bm > m) {
    sum *= std::exp(static_cast<double>(m) - bm);
    m = bm;
  }
  return vsplat(m == -INFINITY ? 0.0f : m);
}

// The max of x[b, e), e - b a positive multiple of kLanes, with kAcc running maxima.
template <typename T>
[[gnu::always_inline]] static inline float block_max(const T* x, int64_t b, int64_t e) {
  vfloat m[kAcc];
  for (int k = 0; k < kAcc; ++k) m[k] = vsplat(-INFINITY);
  int64_t i = b;
  for (; i + kAcc * kLanes <= e; i += kAcc * kLanes) {
    for (int k = 0; k < kAcc; ++k) {
      if (k * kLanes * sizeof(T) % 64 == 0) prefetch_ahead(x + i + k * kLanes);  // once a line
      m[k] = vmax(m[k], vload(x + i + k * kLanes));
    }
  }
  for (; i < e; i += kLanes) m[0] = vmax(m[0], vload(x + i));
  for (int k = 1; k < kAcc; ++k) m[0] = vmax(m[0], m[k]);
  return hmax(m[0]);
}

// sum of exp(x - off) over x[b, e), e - b a positive multiple of kLanes, with kAcc running sums.
template <typename T>
[[gnu::always_inline]] static inline double block_sum_exp(const T* x, int64_t b, int64_t e,
                                                          vfloat off) {
  vfloat acc[kAcc];
  for (int k = 0; k < kAcc; ++k) acc[k] = vfloat{};
  int64_t i = b;
  for (; i + kAcc * kLanes <= e; i += kAcc * kLanes)
    for (int k = 0; k < kAcc; ++k) acc[k] += vexp_upto88(vload(x + i + k * kLanes) - off);
  for (; i < e; i += kLanes) acc[0] += vexp_upto88(vload(x + i) - off);
  for (int k = 1; k < kAcc; ++k) acc[0] += acc[k];
  return hsum(acc[0]);
}

// log sum_v exp(x_v), one pass: a running max m and a running sum of exp(x - m) (in double,
// rescaled when a block raises the max). The row is a prologue of fewer than kLanes elements up
// to the first aligned one, an aligned body of whole vectors, and a tail of fewer than kLanes;
// prologue and tail go first, together, as two partial vectors padded with -inf (exp(-inf) = 0).
//
// NaN and inf as torch.log_softmax: a NaN anywhere, or a +inf (exp(+inf - +inf) = NaN), makes
// the sum and so the lse NaN; a row of -inf only gives m = -inf, sum = 0, lse = -inf. The max
// itself may drop a NaN (vmax is `a > b ? a : b`, one instruction); the sum never does, because
// vexp keeps NaN and the exps are taken from an offset that is never -inf (raise_max).
template <typename T>
static float row_lse(const T* x, int64_t V) {
  const int64_t head = lead<kLanes>(x, V);
  const int64_t body_end = head + (V - head) / kLanes * kLanes;
  float m = -INFINITY;
  double sum = 0.0;
  {
    const vfloat a = load_part(x, head, -INFINITY);
    const vfloat b = load_part(x + body_end, V - body_end, -INFINITY);
    const vfloat off = raise_max(hmax(vmax(a, b)), m, sum);
    sum += hsum(vexp_upto88(a - off) + vexp_upto88(b - off));
  }
  for (int64_t b = head; b < body_end; b += kBlock) {
    const int64_t e = std::min(body_end, b + kBlock);
    const vfloat off = raise_max(block_max(x, b, e), m, sum);
    sum += block_sum_exp(x, b, e, off);
  }
  return m + static_cast<float>(std::log(sum));
}

// g = coef * (onehot(y) - exp(x - lse)). g may be x itself (in-place backward): x[y] is read
// before the loop, and every other element is read before it is overwritten. The aligned body
// starts at g's first aligned element (the stores; x has the same alignment in place, and for
// the fresh gradient of contiguous logits). A NaN lse (a row with NaN or +inf) gives a NaN row.
template <typename T>
static void row_grad(const T* x, T* g, int64_t V, float lse, float coef, int64_t y) {
  const float p_y = std::exp(static_cast<float>(x[y]) - lse);
  const float g_y = -coef * (p_y - 1.0f);  // p_y - 1 in float32, rounded to T once
  const int64_t head = lead<kLanes>(g, V);
  const int64_t body_end = head + (V - head) / kLanes * kLanes;
  const vfloat vl = vsplat(lse), vc = vsplat(-coef);
  store_part(g, vc * vexp(load_part(x, head, 0.0f) - vl), head);
  for (int64_t i = head; i < body_end; i += kLanes) {
    prefetch_ahead(x + i);
    prefetch_ahead(g + i);  // the same line when in place; else the line the store will own
    vstore(g + i, vc * vexp(vload(x + i) - vl));
  }
  const int64_t tail = V - body_end;
  store_part(g + body_end, vc * vexp(load_part(x + body_end, tail, 0.0f) - vl), tail);
  g[y] = static_cast<T>(g_y);
}

template <typename T>
static RowKernels<T> table() {
  return {&row_lse<T>, &row_grad<T>};
}
