/* Fused per-candidate passes for the elementwise merges (linear, slerp, task arithmetic, nuslerp,
 * nearswap, multislerp, karcher's iteration, sce), compiled on first
 * use by native.py (x86-64 with AVX2, FMA and F16C) and checked there, bit for bit, against the
 * eager torch passes they replace before they are used.
 *
 * Each function repeats the eager pass's operations in the same order and dtypes: a half-type
 * torch operation computes in float32 and rounds its result to the half type (round to nearest
 * even), which is what round_to() does between the steps. Built with -ffp-contract=off so that
 * no multiply-add is fused unless written as one (torch's addcmul_ is, on CPUs with FMA).
 *
 * dtype codes: 0 float16, 1 bfloat16, 2 float32. Eight elements per step; the last partial step
 * runs on a zero-padded copy, so every element goes through the same vector operations.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define LANES 8

static inline __attribute__((always_inline)) __m256 load_f16(const void *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

static inline __attribute__((always_inline)) __m256 load_bf16(const void *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

static inline __attribute__((always_inline)) __m256 load_as(int dtype, const void *p) {
    if (dtype == 0) return load_f16(p);
    if (dtype == 1) return load_bf16(p);
    return _mm256_loadu_ps((const float *)p);
}

/* float32 -> bfloat16, round to nearest even; NaN becomes `nan_bits` (torch's vector path). */
static inline __attribute__((always_inline)) __m128i to_bf16(__m256 v, int nan_bits) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(nan_bits), nan);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

static inline __attribute__((always_inline)) void store_as(int dtype, void *p, __m256 v, int nan_bits) {
    if (dtype == 0) _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    else if (dtype == 1) _mm_storeu_si128((__m128i *)p, to_bf16(v, nan_bits));
    else _mm256_storeu_ps((float *)p, v);
}

/* the value a torch operation in `dtype` leaves: float32 rounded to the half type and back */
static inline __attribute__((always_inline)) __m256 round_to(int dtype, __m256 v, int nan_bits) {
    if (dtype == 0) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    if (dtype == 1) {
        __m128i bits = to_bf16(v, nan_bits);
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
    }
    return v;
}

static inline __attribute__((always_inline)) int element_size(int dtype) { return dtype == 2 ? 4 : 2; }

/* The last partial step reads zero-padded copies: `padded[i]` points at row i's copy of the
 * `rest` bytes from `offset` (NULL rows stay NULL). */
typedef char Lane[LANES * 4];

static void pad_rows(const char *const *rows, int n, int64_t offset, int64_t rest, Lane *copies,
                     const char **padded) {
    for (int i = 0; i < n; i++) {
        padded[i] = 0;
        if (!rows[i]) continue;
        memset(copies[i], 0, sizeof(Lane));
        memcpy(copies[i], rows[i] + offset, rest);
        padded[i] = copies[i];
    }
}

/* bfloat16's NaN pattern at element j: torch's vector loop writes `nan_bits`, its scalar loop over
 * the last elements (from `tail_start`, numel less numel modulo its vector size) `tail_nan_bits`. */
static inline __attribute__((always_inline)) int nan_at(int64_t j, int nan_bits, int tail_nan_bits,
                                                        int64_t tail_start) {
    return j >= tail_start ? tail_nan_bits : nan_bits;
}

/* linear: acc = x_0 * c_0, then acc = fma(x_i, c_i, acc) (or mul + add), / denominator, one rounding. */
static inline __attribute__((always_inline)) __m256 linear_step(int dtype, const char *const *xs, int64_t offset, int n, const float *c,
                                 int use_fma, int normalize, float denominator) {
    __m256 acc = _mm256_mul_ps(load_as(dtype, xs[0] + offset), _mm256_set1_ps(c[0]));
    for (int i = 1; i < n; i++) {
        __m256 x = load_as(dtype, xs[i] + offset);
        acc = use_fma ? _mm256_fmadd_ps(x, _mm256_set1_ps(c[i]), acc)
                      : _mm256_add_ps(acc, _mm256_mul_ps(x, _mm256_set1_ps(c[i])));
    }
    if (normalize) acc = _mm256_div_ps(acc, _mm256_set1_ps(denominator));
    return acc;
}

static inline __attribute__((always_inline)) void linear_impl(int dtype, const char *const *xs, int n, const float *c, int use_fma, int normalize,
                 float denominator, int nan_bits, int tail_nan_bits, int64_t tail_start, char *out, int64_t numel) {
    const int size = element_size(dtype);
    int64_t j = 0;
    for (; j + LANES <= numel; j += LANES) {
        __m256 acc = linear_step(dtype, xs, j * size, n, c, use_fma, normalize, denominator);
        store_as(dtype, out + j * size, acc, nan_at(j, nan_bits, tail_nan_bits, tail_start));
    }
    if (j == numel) return;
    /* the tail: the same step on zero-padded copies */
    Lane pad[16], result;
    const char *padded[16] = {0};
    int64_t rest = (numel - j) * size;
    pad_rows(xs, n, j * size, rest, pad, padded);
    store_as(dtype, result, linear_step(dtype, padded, 0, n, c, use_fma, normalize, denominator),
             nan_at(j, nan_bits, tail_nan_bits, tail_start));
    memcpy(out + j * size, result, rest);
}

/* Options of delta_sum_pass, as native.py fills them (field order and types must match there). */
typedef struct {
    int has_base;   /* deltas from the base, and the base added back at the end */
    int plus_zero;  /* the sum + 0 (torch's sum over rows of a half tensor starts from +0) */
    int normalize;  /* the sum / divisor */
    int scale;      /* the sum * lambda */
    float divisor;
    float lambda;
    int nan_bits;   /* bfloat16 rounding of a NaN: see nan_at */
    int tail_nan_bits;
    int64_t tail_start;
} DeltaSumOptions;

/* Weighted sum of deltas in the inputs' dtype, each operation rounded to it as torch's is:
 *   d_i = x_i - base, d_i = d_i * w_i, summed (two rows: one add in the dtype; more: float32 adds,
 *   one rounding), [+ 0], [/ divisor], [* lambda], [+ base].
 * task arithmetic, and nuslerp's flattened pass (w = the sine coefficients, divisor sin theta). */
static inline __attribute__((always_inline)) __m256 delta_sum_step(int dtype, const char *const *xs,
        const char *base, int64_t offset, int n, const float *w, const DeltaSumOptions *o) {
    __m256 b = o->has_base ? load_as(dtype, base + offset) : _mm256_setzero_ps();
    __m256 total = _mm256_setzero_ps();
    for (int i = 0; i < n; i++) {
        __m256 d = load_as(dtype, xs[i] + offset);
        if (o->has_base) d = round_to(dtype, _mm256_sub_ps(d, b), o->nan_bits);
        d = round_to(dtype, _mm256_mul_ps(d, _mm256_set1_ps(w[i])), o->nan_bits);
        if (i == 0) total = d;
        else if (n == 2) total = round_to(dtype, _mm256_add_ps(total, d), o->nan_bits);
        else total = _mm256_add_ps(total, d);
    }
    /* + 0 of a value the dtype holds is exact: a rounding is needed only after a float32 sum */
    if (o->plus_zero) total = _mm256_add_ps(total, _mm256_setzero_ps());
    if (n > 2) total = round_to(dtype, total, o->nan_bits);
    if (o->normalize) total = round_to(dtype, _mm256_div_ps(total, _mm256_set1_ps(o->divisor)), o->nan_bits);
    if (o->scale) total = round_to(dtype, _mm256_mul_ps(total, _mm256_set1_ps(o->lambda)), o->nan_bits);
    return o->has_base ? _mm256_add_ps(total, b) : total;
}

static inline __attribute__((always_inline)) void delta_sum_impl(int dtype, const char *const *xs,
        const char *base, int n, const float *w, const DeltaSumOptions *o, char *out, int64_t numel) {
    const int size = element_size(dtype);
    /* local copies: the stores through `out` (char *) could alias *o, which would reload it per step */
    const DeltaSumOptions options = *o;
    DeltaSumOptions tail = *o;
    tail.nan_bits = o->tail_nan_bits;
    o = &options;
    int64_t j = 0;
    for (; j + LANES <= numel; j += LANES) {
        const DeltaSumOptions *at = j >= o->tail_start ? &tail : o;
        store_as(dtype, out + j * size, delta_sum_step(dtype, xs, base, j * size, n, w, at), at->nan_bits);
    }
    if (j == numel) return;
    Lane pad[17], result;
    const char *rows[17] = {0}, *padded[17] = {0};
    int64_t rest = (numel - j) * size;
    for (int i = 0; i < n; i++) rows[i] = xs[i];
    rows[n] = o->has_base ? base : 0;
    pad_rows(rows, n + 1, j * size, rest, pad, padded);
    const DeltaSumOptions *at = j >= o->tail_start ? &tail : o;
    store_as(dtype, result, delta_sum_step(dtype, padded, padded[n], 0, n, w, at), at->nan_bits);
    memcpy(out + j * size, result, rest);
}

/* nearswap: w = |base - other| (rounded), clamp_min(floor), 1 / w, * t, clamp(0, 1), each rounded;
 * rest = (1 - w) * base; result = w * other + rest. clamp keeps a NaN (max/min return their
 * second operand when either is NaN), as torch's does. */
static inline __attribute__((always_inline)) __m256 nearswap_step(int dtype, const char *base, const char *other,
        int64_t offset, float t, float floor, int nan_bits) {
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 x = load_as(dtype, base + offset), y = load_as(dtype, other + offset);
    __m256 w = round_to(dtype, _mm256_sub_ps(x, y), nan_bits);
    w = _mm256_and_ps(w, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
    w = _mm256_max_ps(_mm256_set1_ps(floor), w);
    w = round_to(dtype, _mm256_div_ps(one, w), nan_bits);
    w = round_to(dtype, _mm256_mul_ps(w, _mm256_set1_ps(t)), nan_bits);
    w = _mm256_min_ps(one, _mm256_max_ps(_mm256_setzero_ps(), w));
    __m256 rest = round_to(dtype, _mm256_sub_ps(one, w), nan_bits);
    rest = round_to(dtype, _mm256_mul_ps(rest, x), nan_bits);
    __m256 result = round_to(dtype, _mm256_mul_ps(w, y), nan_bits);
    return _mm256_add_ps(result, rest);
}

static inline __attribute__((always_inline)) void nearswap_impl(int dtype, const char *base, const char *other,
        float t, float floor, int nan_bits, int tail_nan_bits, int64_t tail_start, char *out, int64_t numel) {
    const int size = element_size(dtype);
    int64_t j = 0;
    for (; j + LANES <= numel; j += LANES) {
        int nb = nan_at(j, nan_bits, tail_nan_bits, tail_start);
        store_as(dtype, out + j * size, nearswap_step(dtype, base, other, j * size, t, floor, nb), nb);
    }
    if (j == numel) return;
    Lane copies[2], result;
    const char *rows[2] = {base, other}, *padded[2];
    int64_t rest = (numel - j) * size;
    pad_rows(rows, 2, j * size, rest, copies, padded);
    int nb = nan_at(j, nan_bits, tail_nan_bits, tail_start);
    store_as(dtype, result, nearswap_step(dtype, padded[0], padded[1], 0, t, floor, nb), nb);
    memcpy(out + j * size, result, rest);
}

/* multislerp, the four passes of methods/multislerp.py's _ChunkedPass; u_i = (x_i [- base]) / scale_i,
 * each rounded. Every pass writes whole vectors that torch then reduces (norms and dot products). */
static inline __attribute__((always_inline)) __m256 unit_of(int dtype, const char *x, const char *base,
        int64_t offset, float scale, int nan_bits) {
    __m256 u = load_as(dtype, x + offset);
    if (base) u = round_to(dtype, _mm256_sub_ps(u, load_as(dtype, base + offset)), nan_bits);
    return round_to(dtype, _mm256_div_ps(u, _mm256_set1_ps(scale)), nan_bits);
}

/* the rows p_i summed as torch sums rows of a (n, k) tensor: see delta_sum_step */
static inline __attribute__((always_inline)) __m256 row_sum_step(int dtype, __m256 total, __m256 p, int i, int n,
                                                                 int nan_bits) {
    if (i == 0) return p;
    if (n == 2) return round_to(dtype, _mm256_add_ps(total, p), nan_bits);
    return _mm256_add_ps(total, p);
}

static inline __attribute__((always_inline)) __m256 row_sum_end(int dtype, __m256 total, int n, int nan_bits) {
    if (dtype == 2) return total;  /* float32: torch.sum, no + 0 (up to four rows: more, torch adds in another order) */
    total = _mm256_add_ps(total, _mm256_setzero_ps());
    return n > 2 ? round_to(dtype, total, nan_bits) : total;
}

typedef struct {
    const char *const *xs;
    const char *base;     /* NULL: no base */
    int n;
    const float *scales;  /* norm_i + eps */
    const float *weights;
    const float *dots;    /* pass 3 */
    float mean_norm;      /* pass 2, row 0: the mean divided by it in place */
    float cos, sin_over, mean_input_norm;  /* pass 4 */
    int row;              /* pass 2 */
    int nan_bits;         /* see nan_at */
    int tail_nan_bits;
    int64_t tail_start;
} MultiSlerpOptions;

/* pass 1: mean = sum of u_i * w_i */
static inline __attribute__((always_inline)) void ms_mean_step(int dtype, const MultiSlerpOptions *o, int64_t off,
        char *mean) {
    __m256 total = _mm256_setzero_ps();
    for (int i = 0; i < o->n; i++) {
        __m256 u = unit_of(dtype, o->xs[i], o->base, off, o->scales[i], o->nan_bits);
        __m256 p = round_to(dtype, _mm256_mul_ps(u, _mm256_set1_ps(o->weights[i])), o->nan_bits);
        total = row_sum_step(dtype, total, p, i, o->n, o->nan_bits);
    }
    store_as(dtype, mean + off, row_sum_end(dtype, total, o->n, o->nan_bits), o->nan_bits);
}

/* pass 2, one row: [mean /= mean_norm in place, on row 0]; vector = u_row * mean */
static inline __attribute__((always_inline)) void ms_products_step(int dtype, const MultiSlerpOptions *o,
        int64_t off, char *mean, char *vector) {
    __m256 m = load_as(dtype, mean + off);
    if (o->row == 0) {
        m = round_to(dtype, _mm256_div_ps(m, _mm256_set1_ps(o->mean_norm)), o->nan_bits);
        store_as(dtype, mean + off, m, o->nan_bits);
    }
    __m256 u = unit_of(dtype, o->xs[o->row], o->base, off, o->scales[o->row], o->nan_bits);
    store_as(dtype, vector + off, _mm256_mul_ps(u, m), o->nan_bits);
}

/* pass 3: vector = sum of (u_i - dot_i * mean) * w_i */
static inline __attribute__((always_inline)) void ms_tangent_step(int dtype, const MultiSlerpOptions *o, int64_t off,
        char *mean, char *vector) {
    __m256 m = load_as(dtype, mean + off);
    __m256 total = _mm256_setzero_ps();
    for (int i = 0; i < o->n; i++) {
        __m256 u = unit_of(dtype, o->xs[i], o->base, off, o->scales[i], o->nan_bits);
        __m256 along = round_to(dtype, _mm256_mul_ps(_mm256_set1_ps(o->dots[i]), m), o->nan_bits);
        u = round_to(dtype, _mm256_sub_ps(u, along), o->nan_bits);
        __m256 p = round_to(dtype, _mm256_mul_ps(u, _mm256_set1_ps(o->weights[i])), o->nan_bits);
        total = row_sum_step(dtype, total, p, i, o->n, o->nan_bits);
    }
    store_as(dtype, vector + off, row_sum_end(dtype, total, o->n, o->nan_bits), o->nan_bits);
}

/* pass 4: out = (mean * cos + vector * sin_over) * mean_input_norm [+ base] */
static inline __attribute__((always_inline)) void ms_result_step(int dtype, const MultiSlerpOptions *o, int64_t off,
        char *mean, char *vector, char *out) {
    __m256 r = round_to(dtype, _mm256_mul_ps(load_as(dtype, mean + off), _mm256_set1_ps(o->cos)), o->nan_bits);
    __m256 q = round_to(dtype, _mm256_mul_ps(load_as(dtype, vector + off), _mm256_set1_ps(o->sin_over)), o->nan_bits);
    r = round_to(dtype, _mm256_add_ps(r, q), o->nan_bits);
    r = _mm256_mul_ps(r, _mm256_set1_ps(o->mean_input_norm));
    if (o->base) r = _mm256_add_ps(round_to(dtype, r, o->nan_bits), load_as(dtype, o->base + off));
    store_as(dtype, out + off, r, o->nan_bits);
}

/* Runs pass `which` over [0, numel) of every vector (pointers already offset by the caller); the
 * last partial step on zero-padded copies of everything it reads, written back for what it wrote. */
static inline __attribute__((always_inline)) void ms_impl(int dtype, int which, const MultiSlerpOptions *o,
        char *mean, char *vector, char *out, int64_t numel) {
    const int size = element_size(dtype);
    MultiSlerpOptions tail = *o;
    tail.nan_bits = o->tail_nan_bits;
    int64_t j = 0;
    for (; j + LANES <= numel; j += LANES) {
        int64_t off = j * size;
        const MultiSlerpOptions *at = j >= o->tail_start ? &tail : o;
        if (which == 1) ms_mean_step(dtype, at, off, mean);
        else if (which == 2) ms_products_step(dtype, at, off, mean, vector);
        else if (which == 3) ms_tangent_step(dtype, at, off, mean, vector);
        else ms_result_step(dtype, at, off, mean, vector, out);
    }
    if (j == numel) return;
    int64_t rest = (numel - j) * size, off = j * size;
    /* rows: the inputs, then the base, the mean and the vector where this pass reads them */
    Lane copies[19], pm = {0}, pv = {0}, po;
    const char *rows[19] = {0}, *padded_rows[19] = {0};
    int n = o->n;
    for (int i = 0; i < n; i++) rows[i] = o->xs[i];
    rows[n] = o->base;
    rows[n + 1] = which != 1 ? mean : 0;
    rows[n + 2] = which == 4 ? vector : 0;
    pad_rows(rows, n + 3, off, rest, copies, padded_rows);
    if (padded_rows[n + 1]) memcpy(pm, padded_rows[n + 1], sizeof pm);
    if (padded_rows[n + 2]) memcpy(pv, padded_rows[n + 2], sizeof pv);
    MultiSlerpOptions padded = j >= o->tail_start ? tail : *o;
    padded.xs = padded_rows;
    padded.base = padded_rows[n];
    if (which == 1) ms_mean_step(dtype, &padded, 0, pm);
    else if (which == 2) ms_products_step(dtype, &padded, 0, pm, pv);
    else if (which == 3) ms_tangent_step(dtype, &padded, 0, pm, pv);
    else ms_result_step(dtype, &padded, 0, pm, pv, po);
    if (which == 1 || (which == 2 && o->row == 0)) memcpy(mean + off, pm, rest);
    if (which == 2 || which == 3) memcpy(vector + off, pv, rest);
    if (which == 4) memcpy(out + off, po, rest);
}

/* karcher, the two elementwise passes of one iteration of methods/karcher.py (torch reduces in
 * between: the dots, the norms). `widened`, where not NULL, gets a float32 copy of what the pass
 * writes, for the norm torch takes of it next. */
typedef struct {
    const char *const *units;  /* pass 1: the inputs that take part in this iteration */
    int n;
    const float *dots;         /* pass 1: clamped dot of each unit with the mean */
    const float *coefs;        /* pass 1: share * theta / sin(theta), in the dtype */
    float cos, sin, norm;      /* pass 2: of the tangent's norm */
    int reciprocal;            /* pass 2: tangent / norm as tangent * (1 / norm) */
    int nan_bits;              /* see nan_at */
    int tail_nan_bits;
    int64_t tail_start;
} KarcherOptions;

static inline __attribute__((always_inline)) void store_widened(float *widened, int64_t j, __m256 v) {
    if (widened) _mm256_storeu_ps(widened + j, v);
}

/* pass 1: tangent = +0, then tangent += coef_i * (u_i - dot_i * mean) for each unit, each rounded */
static inline __attribute__((always_inline)) __m256 karcher_tangent_step(int dtype, const KarcherOptions *o,
        const char *const *units, const char *mean, int64_t off) {
    __m256 m = load_as(dtype, mean + off), total = _mm256_setzero_ps();
    for (int i = 0; i < o->n; i++) {
        __m256 s = round_to(dtype, _mm256_mul_ps(_mm256_set1_ps(o->dots[i]), m), o->nan_bits);
        s = round_to(dtype, _mm256_sub_ps(load_as(dtype, units[i] + off), s), o->nan_bits);
        s = round_to(dtype, _mm256_mul_ps(_mm256_set1_ps(o->coefs[i]), s), o->nan_bits);
        total = round_to(dtype, _mm256_add_ps(total, s), o->nan_bits);
    }
    return total;
}

/* pass 2: mean = cos * mean + sin * (tangent / norm), each rounded */
static inline __attribute__((always_inline)) __m256 karcher_update_step(int dtype, const KarcherOptions *o,
        const char *mean, const char *tangent, int64_t off) {
    __m256 a = round_to(dtype, _mm256_mul_ps(_mm256_set1_ps(o->cos), load_as(dtype, mean + off)), o->nan_bits);
    __m256 t = load_as(dtype, tangent + off);
    t = o->reciprocal ? _mm256_mul_ps(t, _mm256_set1_ps(1.0f / o->norm)) : _mm256_div_ps(t, _mm256_set1_ps(o->norm));
    t = round_to(dtype, t, o->nan_bits);
    __m256 b = round_to(dtype, _mm256_mul_ps(_mm256_set1_ps(o->sin), t), o->nan_bits);
    return round_to(dtype, _mm256_add_ps(a, b), o->nan_bits);
}

static inline __attribute__((always_inline)) void karcher_impl(int dtype, int which, const KarcherOptions *o,
        char *mean, char *tangent, float *widened, int64_t numel) {
    const int size = element_size(dtype);
    KarcherOptions tail = *o;
    tail.nan_bits = o->tail_nan_bits;
    char *written = which == 1 ? tangent : mean;
    int64_t j = 0;
    for (; j + LANES <= numel; j += LANES) {
        const KarcherOptions *at = j >= o->tail_start ? &tail : o;
        __m256 r = which == 1 ? karcher_tangent_step(dtype, at, o->units, mean, j * size)
                              : karcher_update_step(dtype, at, mean, tangent, j * size);
        store_as(dtype, written + j * size, r, at->nan_bits);
        store_widened(widened, j, r);
    }
    if (j == numel) return;
    int64_t rest = (numel - j) * size;
    Lane copies[18], result;
    const char *rows[18] = {0}, *padded[18] = {0};
    int n = which == 1 ? o->n : 0;
    for (int i = 0; i < n; i++) rows[i] = o->units[i];
    rows[n] = mean;
    rows[n + 1] = which == 2 ? tangent : 0;
    pad_rows(rows, n + 2, j * size, rest, copies, padded);
    const KarcherOptions *at = j >= o->tail_start ? &tail : o;
    __m256 r = which == 1 ? karcher_tangent_step(dtype, at, padded, padded[n], 0)
                          : karcher_update_step(dtype, at, padded[n], padded[n + 1], 0);
    store_as(dtype, result, r, at->nan_bits);
    memcpy(written + j * size, result, rest);
    if (widened) {
        float wide[LANES];
        _mm256_storeu_ps(wide, r);
        memcpy(widened + j, wide, (numel - j) * sizeof(float));
    }
}

/* sce without selection (methods/sce.py's _merge_chunked): d_i = x_i - base; the majority sign of
 * their sum; e_i = w_i where d_i has that sign, else +0; base + sum(d_i * e_i) / max(sum(e_i), floor),
 * every operation rounded to the dtype and every sum taken as torch sums rows. */
typedef struct {
    const char *const *xs;  /* the children */
    const char *base;
    int n;
    const float *weights;   /* the shares, >= 0 */
    float floor;            /* 1e-6 in the dtype */
    int nan_bits;
    int tail_nan_bits;
    int64_t tail_start;
} SceOptions;

static inline __attribute__((always_inline)) __m256 sce_step(int dtype, const SceOptions *o, const char *const *xs,
        const char *base, int64_t off, int nb) {
    const __m256 zero = _mm256_setzero_ps();
    __m256 x = load_as(dtype, base + off), d[16], total = zero, denom = zero, merged = zero;
    for (int i = 0; i < o->n; i++) {
        d[i] = round_to(dtype, _mm256_sub_ps(load_as(dtype, xs[i] + off), x), nb);
        total = row_sum_step(dtype, total, d[i], i, o->n, nb);
    }
    total = row_sum_end(dtype, total, o->n, nb);
    __m256 positive = _mm256_cmp_ps(total, zero, _CMP_GE_OQ);  /* NaN: false, a majority of -1 */
    for (int i = 0; i < o->n; i++) {
        __m256 agree = _mm256_blendv_ps(_mm256_cmp_ps(d[i], zero, _CMP_LT_OQ), _mm256_cmp_ps(d[i], zero, _CMP_GT_OQ),
                                        positive);
        __m256 e = _mm256_and_ps(agree, _mm256_set1_ps(o->weights[i]));
        denom = row_sum_step(dtype, denom, e, i, o->n, nb);
        merged = row_sum_step(dtype, merged, round_to(dtype, _mm256_mul_ps(d[i], e), nb), i, o->n, nb);
    }
    denom = _mm256_max_ps(_mm256_set1_ps(o->floor), row_sum_end(dtype, denom, o->n, nb));  /* keeps a NaN */
    merged = round_to(dtype, _mm256_div_ps(row_sum_end(dtype, merged, o->n, nb), denom), nb);
    return _mm256_add_ps(x, merged);
}

static inline __attribute__((always_inline)) void sce_impl(int dtype, const SceOptions *o, char *out, int64_t numel) {
    const int size = element_size(dtype);
    int64_t j = 0;
    for (; j + LANES <= numel; j += LANES) {
        int nb = nan_at(j, o->nan_bits, o->tail_nan_bits, o->tail_start);
        store_as(dtype, out + j * size, sce_step(dtype, o, o->xs, o->base, j * size, nb), nb);
    }
    if (j == numel) return;
    Lane pad[17], result;
    const char *rows[17] = {0}, *padded[17] = {0};
    int64_t rest = (numel - j) * size;
    for (int i = 0; i < o->n; i++) rows[i] = o->xs[i];
    rows[o->n] = o->base;
    pad_rows(rows, o->n + 1, j * size, rest, pad, padded);
    int nb = nan_at(j, o->nan_bits, o->tail_nan_bits, o->tail_start);
    store_as(dtype, result, sce_step(dtype, o, padded, padded[o->n], 0, nb), nb);
    memcpy(out + j * size, result, rest);
}

/* the entry points: one specialised copy of each pass per dtype */
void linear_pass(int dtype, const char *const *xs, int n, const float *c, int use_fma, int normalize,
                 float denominator, int nan_bits, int tail_nan_bits, int64_t tail_start, char *out, int64_t numel) {
    if (dtype == 0) linear_impl(0, xs, n, c, use_fma, normalize, denominator, 0, 0, 0, out, numel);
    else if (dtype == 1)
        linear_impl(1, xs, n, c, use_fma, normalize, denominator, nan_bits, tail_nan_bits, tail_start, out, numel);
    else linear_impl(2, xs, n, c, use_fma, normalize, denominator, 0, 0, 0, out, numel);
}

void delta_sum_pass(int dtype, const char *const *xs, const char *base, int n, const float *w,
                    const DeltaSumOptions *o, char *out, int64_t numel) {
    /* two and three inputs (the common cases) as copies with the input loop unrolled */
    if (dtype == 0 && n == 2) delta_sum_impl(0, xs, base, 2, w, o, out, numel);
    else if (dtype == 0 && n == 3) delta_sum_impl(0, xs, base, 3, w, o, out, numel);
    else if (dtype == 0) delta_sum_impl(0, xs, base, n, w, o, out, numel);
    else if (dtype == 1 && n == 2) delta_sum_impl(1, xs, base, 2, w, o, out, numel);
    else if (dtype == 1 && n == 3) delta_sum_impl(1, xs, base, 3, w, o, out, numel);
    else if (dtype == 1) delta_sum_impl(1, xs, base, n, w, o, out, numel);
    else delta_sum_impl(2, xs, base, n, w, o, out, numel);
}

void nearswap_pass(int dtype, const char *base, const char *other, float t, float floor, int nan_bits,
                   int tail_nan_bits, int64_t tail_start, char *out, int64_t numel) {
    if (dtype == 0) nearswap_impl(0, base, other, t, floor, 0, 0, 0, out, numel);
    else if (dtype == 1) nearswap_impl(1, base, other, t, floor, nan_bits, tail_nan_bits, tail_start, out, numel);
    else nearswap_impl(2, base, other, t, floor, 0, 0, 0, out, numel);
}

void multislerp_pass(int dtype, int which, const MultiSlerpOptions *o, char *mean, char *vector, char *out,
                     int64_t numel) {
    if (dtype == 0) ms_impl(0, which, o, mean, vector, out, numel);
    else if (dtype == 1) ms_impl(1, which, o, mean, vector, out, numel);
    else ms_impl(2, which, o, mean, vector, out, numel);
}

void karcher_pass(int dtype, int which, const KarcherOptions *o, char *mean, char *tangent, float *widened,
                  int64_t numel) {
    if (dtype == 0) karcher_impl(0, which, o, mean, tangent, widened, numel);
    else if (dtype == 1) karcher_impl(1, which, o, mean, tangent, widened, numel);
    else karcher_impl(2, which, o, mean, tangent, widened, numel);
}

void sce_pass(int dtype, const SceOptions *o, char *out, int64_t numel) {
    if (dtype == 0) sce_impl(0, o, out, numel);
    else if (dtype == 1) sce_impl(1, o, out, numel);
    else sce_impl(2, o, out, numel);
}
