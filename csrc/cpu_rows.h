// The row kernels of the CPU forward and backward passes, written once and compiled once per
// CPU capability (see cpu_kernels.h).
//
// No include guard on purpose: csrc/cpu_kernels.cpp includes this file inside a different
// namespace under a different `#pragma GCC target` each time, so each copy is a distinct set of
// functions (no ODR clash between copies compiled for different instruction sets). It uses
// GCC vector extensions: a 16-float vector is one zmm register with AVX-512, two ymm with AVX2
// and four xmm with the x86-64 baseline (SSE2), so one source serves all three.
//
// What the two row kernels compute is docs/method.md (the token log-probabilities, and the
// gradient with respect to the logits); their contract is RowKernels in cpu_kernels.h.

typedef float vfloat __attribute__((vector_size(64)));     // 16 x float32
typedef int32_t vint __attribute__((vector_size(64)));     // 16 x int32
typedef uint32_t vuint __attribute__((vector_size(64)));   // 16 x uint32
typedef uint16_t vushort __attribute__((vector_size(32)));  // 16 x uint16 (bf16 bits)
constexpr int64_t kLanes = 16;
// Rows are processed in blocks that stay in L1: the block's max first, then its exps from L1,
// so that each element is read from memory once and exponentiated once.
constexpr int64_t kBlock = 1024;

[[gnu::always_inline]] static inline vfloat vsplat(float x) { return vfloat{} + x; }
[[gnu::always_inline]] static inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }

// exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (Cody-Waite
// split of ln 2 so that r is exact), exp(r) by its degree-6 Taylor polynomial (error < 2 ulp).
// Below log(FLT_MIN) the result is flushed to 0; inputs here are x - max or x - lse <= ~0.
// NaN gives NaN: the clamps compare with x on the side that keeps x when the comparison is
// false (`x < lo ? lo : x`), and a NaN fails every comparison; exp(+inf - +inf) = exp(NaN) is
// how a +inf logit makes its row's lse NaN, as in torch.log_softmax.
// Inlined everywhere: a call would pass 64-byte vectors through memory on narrower targets.
[[gnu::always_inline]] static inline vfloat vexp(vfloat x) {
  const vfloat lo = vsplat(-87.33f), hi = vsplat(88.5f);
  const vfloat xl = x < lo ? lo : x;
  const vfloat xc = xl > hi ? hi : xl;
  const vfloat magic = vsplat(12582912.0f);                 // 1.5 * 2^23: rounds to integer
  const vfloat t = xc * vsplat(1.44269504f) + magic;
  const vfloat n = t - magic;
  const vfloat r = (xc - n * vsplat(0.693359375f)) - n * vsplat(-2.12194440e-4f);
  vfloat p = vsplat(1.0f / 720.0f);
  p = p * r + vsplat(1.0f / 120.0f);
  p = p * r + vsplat(1.0f / 24.0f);
  p = p * r + vsplat(1.0f / 6.0f);
  p = p * r + vsplat(0.5f);
  p = p * r + vsplat(1.0f);
  p = p * r + vsplat(1.0f);
  // 2^n: n + 127 in the exponent field (t's low mantissa bits hold n + 0x400000).
  const vint scale_bits = (((vint)t - (vint)magic) + 127) << 23;
  const vfloat y = p * (vfloat)scale_bits;
  return x < lo ? vfloat{} : y;
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

// Loads and stores of 16 elements, converting to and from float32.
[[gnu::always_inline]] static inline vfloat load16(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
[[gnu::always_inline]] static inline vfloat load16(const c10::BFloat16* p) {
  // bf16 is the top half of a float32.
  vushort h;
  std::memcpy(&h, p, sizeof(h));
  return (vfloat)(__builtin_convertvector(h, vuint) << 16);
}
[[gnu::always_inline]] static inline vfloat load16(const c10::Half* p) {
  vfloat v;
  for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}
[[gnu::always_inline]] static inline void store16(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
[[gnu::always_inline]] static inline void store16(c10::BFloat16* p, vfloat v) {
  // Round to nearest even, as c10::BFloat16 does; NaN stays a (quiet) NaN.
  const vuint u = (vuint)v;
  const vuint rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const vuint bits = (u & 0x7fffffffu) > 0x7f800000u ? vuint{} + 0x7fc0u : rounded;
  const vushort h = __builtin_convertvector(bits, vushort);
  std::memcpy(p, &h, sizeof(h));
}
[[gnu::always_inline]] static inline void store16(c10::Half* p, vfloat v) {
  for (int i = 0; i < kLanes; ++i) p[i] = c10::Half(v[i]);
}

// The first n < 16 elements at p as a vector whose other lanes are `fill`, and the first n
// lanes of v stored at p; the same float32 conversions and rounding as load16 / store16.
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

// log sum_v exp(x_v), one pass: a running max m and a running sum of exp(x - m) (in double,
// rescaled when a block raises the max). The row is a prologue of fewer than 16 elements up to
// the first aligned one, an aligned body of whole vectors, and a tail of fewer than 16; prologue
// and tail go first, together, as two partial vectors padded with -inf (exp(-inf) = 0).
//
// NaN and inf as torch.log_softmax: a NaN anywhere, or a +inf (exp(+inf - +inf) = NaN), makes
// the sum and so the lse NaN; a row of -inf only gives m = -inf, sum = 0, lse = -inf. The max
// itself may drop a NaN (vmax is `a > b ? a : b`, one instruction); the sum never does, because
// vexp keeps NaN and the exps are taken from an offset that is never -inf: 0 while nothing but
// -inf (and NaN) has been seen, since x - (-inf) would turn every -inf into NaN.
template <typename T>
static float row_lse(const T* x, int64_t V) {
  const int64_t head = lead<kLanes>(x, V);
  const int64_t body_end = head + (V - head) / kLanes * kLanes;
  float m = -INFINITY;
  double sum = 0.0;
  // Raise the running max to the block's max bm; the offset for the block's exps.
  const auto raise = [&](float bm) {
    if (bm > m) {
      sum *= std::exp(static_cast<double>(m) - bm);
      m = bm;
    }
    return vsplat(m == -INFINITY ? 0.0f : m);
  };
  {
    const vfloat a = load_part(x, head, -INFINITY);
    const vfloat b = load_part(x + body_end, V - body_end, -INFINITY);
    const vfloat off = raise(hmax(vmax(a, b)));
    sum += hsum(vexp(a - off) + vexp(b - off));
  }
  for (int64_t b = head; b < body_end; b += kBlock) {
    const int64_t e = std::min(body_end, b + kBlock);
    vfloat vm = load16(x + b);
    for (int64_t i = b + kLanes; i < e; i += kLanes) vm = vmax(vm, load16(x + i));
    const vfloat off = raise(hmax(vm));
    vfloat acc = {};
    for (int64_t i = b; i < e; i += kLanes) acc += vexp(load16(x + i) - off);
    sum += hsum(acc);
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
  for (int64_t i = head; i < body_end; i += kLanes) store16(g + i, vc * vexp(load16(x + i) - vl));
  const int64_t tail = V - body_end;
  store_part(g + body_end, vc * vexp(load_part(x + body_end, tail, 0.0f) - vl), tail);
  g[y] = static_cast<T>(g_y);
}

template <typename T>
static RowKernels<T> table() {
  return {&row_lse<T>, &row_grad<T>};
}
