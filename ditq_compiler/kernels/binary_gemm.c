/* Binary (1-bit) GEMM and conv2d on the CPU: XNOR-popcount over sign bits packed into uint64 words.
 *
 * Signs are bits. A value v with threshold t is stored as bit s = (v < t): 1 means -1, 0 means +1
 * (so sign(0) = +1, and NaN, which compares false, is +1 too). For two sign vectors a, w of length
 * K the dot product of their +-1 values is
 *
 *     sum_k a_k w_k = (#equal) - (#different) = K - 2 popcount(a xor w),
 *
 * which is what ditq_binary_gemm computes for every pair of rows, over packed words (row m of A,
 * row n of B). K is padded to a multiple of 64 with zero bits in both operands, whose xor is 0,
 * so the padding never counts and the true K is used.
 *
 * A zero-padded convolution has positions whose input is 0, which contributes 0: neither +1 nor -1.
 * A per-row bit mask marks the counted bits (all ones where the kernel position falls inside the
 * image, zero where it falls in the padding), and
 *
 *     acc[m, n] = valid[m] - 2 popcount((a_m xor w_n) and mask_m),     valid[m] = popcount(mask_m)
 *
 * (valid[m] is passed in: the number of in-image positions times the channel count).
 * ditq_binary_im2col builds those rows and masks from an NHWC image of packed channel words.
 *
 * Optional fp32 epilogue, in this order, each step rounded to fp32 (compiled with
 * -ffp-contract=off, so nothing is fused into an FMA and the result is bit for bit the same
 * element-wise torch expression):
 *
 *     y[m, n] = ((float(acc) * row_scale[m]) * col_scale[n]) + bias[n]      (absent terms skipped)
 *
 * Two code paths, chosen at run time: AVX-512 with VPOPCNTDQ (8 words per instruction, the
 * output columns across the vector lanes, so no horizontal sums), and a portable path with the
 * scalar popcount builtin. Work is split into (row block x 32-column panel) tasks run by OpenMP,
 * or by pthreads when the library is built without it. Plain C, no torch headers.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DITQ_X86 1
#define DITQ_AVX512 __attribute__((target("avx512f,avx512vpopcntdq")))
#endif

#define DITQ_BINARY_ABI 1
#define NR 32            /* output columns per panel: 4 AVX-512 vectors of 8 x 64-bit lanes */
#define MR 4             /* rows per register tile */
#define ROW_BLOCK_BYTES (192 * 1024)   /* A rows (and masks) per task, kept in L2 */

enum { ISA_AUTO = 0, ISA_PORTABLE = 1, ISA_AVX512 = 2 };
enum { DITQ_OK = 0, DITQ_ERR_ISA = -1, DITQ_ERR_ALLOC = -2, DITQ_ERR_ARG = -3 };

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Waking a thread costs microseconds (far more on a busy machine), so small jobs use fewer threads:
 * at most one per `per_thread` units of work. */
static int threads_for(int threads, int64_t work, int64_t per_thread)
{
    int64_t useful = max64(1, work / per_thread);
    return (int)max64(1, min64(threads, useful));
}

/* ---------------------------------------------------------------- threads */

typedef void (*task_fn)(void *ctx, int64_t task, int thread);

#ifdef _OPENMP
#include <omp.h>

int ditq_binary_threading(void) { return 1; }   /* OpenMP */

static void parallel_for(int64_t n_tasks, int threads, task_fn fn, void *ctx)
{
    if (threads > n_tasks) threads = (int)n_tasks;
    if (threads <= 1) {
        for (int64_t t = 0; t < n_tasks; t++) fn(ctx, t, 0);
        return;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t t = 0; t < n_tasks; t++) fn(ctx, t, omp_get_thread_num());
}

#else
#include <pthread.h>

int ditq_binary_threading(void) { return 2; }   /* pthreads */

struct pool { int64_t next, n_tasks; task_fn fn; void *ctx; };
struct worker { struct pool *pool; int thread; };

static void *run_worker(void *arg)
{
    struct worker *w = arg;
    int64_t t;
    while ((t = __atomic_fetch_add(&w->pool->next, 1, __ATOMIC_RELAXED)) < w->pool->n_tasks)
        w->pool->fn(w->pool->ctx, t, w->thread);
    return NULL;
}

static void parallel_for(int64_t n_tasks, int threads, task_fn fn, void *ctx)
{
    enum { MAX_THREADS = 256 };
    pthread_t ids[MAX_THREADS];
    struct worker workers[MAX_THREADS];
    struct pool pool = { 0, n_tasks, fn, ctx };
    int started = 0;
    if (threads > n_tasks) threads = (int)n_tasks;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    for (int i = 1; i < threads; i++) {   /* a thread that fails to start leaves its work to the others */
        workers[started] = (struct worker){ &pool, started + 1 };
        if (pthread_create(&ids[started], NULL, run_worker, &workers[started]) == 0) started++;
    }
    struct worker self = { &pool, 0 };
    run_worker(&self);
    for (int i = 0; i < started; i++) pthread_join(ids[i], NULL);
}
#endif

/* ------------------------------------------------------------------- ISA */

int ditq_binary_abi_version(void) { return DITQ_BINARY_ABI; }

int ditq_binary_has_avx512_vpopcntdq(void)
{
#ifdef DITQ_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
#else
    return 0;
#endif
}

/* ISA_AUTO -> the best available; an explicit request the CPU cannot run -> -1. */
static int resolve_isa(int isa)
{
    int fast = ditq_binary_has_avx512_vpopcntdq();
    if (isa == ISA_AUTO) return fast ? ISA_AVX512 : ISA_PORTABLE;
    if (isa == ISA_AVX512) return fast ? ISA_AVX512 : -1;
    if (isa == ISA_PORTABLE) return ISA_PORTABLE;
    return -1;
}

int ditq_binary_resolve_isa(int isa) { return resolve_isa(isa); }

/* --------------------------------------------------------------- packing */

struct pack {
    const float *x, *tau;
    uint64_t *out;
    int64_t k, words, m, rows_per_task;
};

static void pack_task_portable(void *p, int64_t t, int thread)
{
    const struct pack *g = p;
    (void)thread;
    for (int64_t m = t * g->rows_per_task; m < min64((t + 1) * g->rows_per_task, g->m); m++) {
        const float *x = g->x + m * g->k;
        uint64_t *out = g->out + m * g->words;
        for (int64_t w = 0; w < g->words; w++) {
            uint64_t bits = 0;
            int64_t k1 = min64(64, g->k - w * 64);
            for (int64_t j = 0; j < k1; j++) {
                float threshold = g->tau ? g->tau[w * 64 + j] : 0.0f;
                bits |= (uint64_t)(x[w * 64 + j] < threshold) << j;
            }
            out[w] = bits;
        }
    }
}

#ifdef DITQ_X86
DITQ_AVX512 static void pack_task_avx512(void *p, int64_t t, int thread)
{
    const struct pack *g = p;
    (void)thread;
    for (int64_t m = t * g->rows_per_task; m < min64((t + 1) * g->rows_per_task, g->m); m++) {
        const float *x = g->x + m * g->k;
        uint64_t *out = g->out + m * g->words;
        for (int64_t w = 0; w < g->words; w++) {
            uint64_t bits = 0;
            for (int q = 0; q < 4; q++) {
                int64_t k0 = w * 64 + q * 16, rest = g->k - k0;
                if (rest <= 0) break;
                __mmask16 live = rest >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << rest) - 1);
                __m512 v = _mm512_maskz_loadu_ps(live, x + k0);
                __m512 th = g->tau ? _mm512_maskz_loadu_ps(live, g->tau + k0) : _mm512_setzero_ps();
                /* ordered less-than: NaN -> 0, and lanes past K stay 0 */
                bits |= (uint64_t)_mm512_mask_cmp_ps_mask(live, v, th, _CMP_LT_OQ) << (q * 16);
            }
            out[w] = bits;
        }
    }
}
#endif

/* x (m, k) fp32 row-major, tau (k) or NULL -> out (m, ceil(k / 64)) words. */
int ditq_pack_signs(const float *x, int64_t m, int64_t k, const float *tau, uint64_t *out, int isa, int threads)
{
    if (m < 0 || k < 1) return DITQ_ERR_ARG;
    isa = resolve_isa(isa);
    if (isa < 0) return DITQ_ERR_ISA;
    struct pack g = { x, tau, out, k, (k + 63) / 64, m, 0 };
    g.rows_per_task = max64(1, (1 << 16) / k);   /* about 256 KiB of input per task */
    int64_t n_tasks = (m + g.rows_per_task - 1) / g.rows_per_task;
    threads = threads_for(threads, m * k, (int64_t)1 << 20);
#ifdef DITQ_X86
    if (isa == ISA_AVX512) {
        parallel_for(n_tasks, threads, pack_task_avx512, &g);
        return DITQ_OK;
    }
#endif
    parallel_for(n_tasks, threads, pack_task_portable, &g);
    return DITQ_OK;
}

/* ------------------------------------------------------------------ GEMM */

struct gemm {
    const uint64_t *a, *mask, *b;
    const int32_t *valid;          /* with mask: counted bits per row; without: k for every row */
    int64_t m, n, words, k;
    int32_t *acc;                  /* int32 output, or */
    float *y;                      /* fp32 output through the epilogue */
    const float *row_scale, *col_scale, *bias;
    int64_t row_block, n_row_blocks, n_panels;
    uint64_t **scratch;            /* one panel buffer per thread (AVX-512 path) */
};

static int64_t valid_bits(const struct gemm *g, int64_t m) { return g->valid ? g->valid[m] : g->k; }

static float epilogue(const struct gemm *g, int64_t m, int64_t n, int64_t acc)
{
    float y = (float)acc;
    if (g->row_scale) y = y * g->row_scale[m];
    if (g->col_scale) y = y * g->col_scale[n];
    if (g->bias) y = y + g->bias[n];
    return y;
}

static void store_scalar(const struct gemm *g, int64_t m, int64_t n, int64_t popcount)
{
    int64_t acc = valid_bits(g, m) - 2 * popcount;
    if (g->acc) g->acc[m * g->n + n] = (int32_t)acc;
    else g->y[m * g->n + n] = epilogue(g, m, n, acc);
}

/* Portable: a 4 x 4 tile of rows of A against rows of B, straight from their row-major words. */
static inline __attribute__((always_inline)) void tile_portable(const struct gemm *g, int64_t m, int64_t n,
                                                                 const int rows, const int cols, const int masked)
{
    uint64_t count[MR][4] = { { 0 } };
    const int64_t words = g->words;
    for (int64_t w = 0; w < words; w++) {
        for (int r = 0; r < rows; r++) {
            uint64_t a = g->a[(m + r) * words + w];
            uint64_t keep = masked ? g->mask[(m + r) * words + w] : ~(uint64_t)0;
            for (int c = 0; c < cols; c++)
                count[r][c] += (uint64_t)__builtin_popcountll((a ^ g->b[(n + c) * words + w]) & keep);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) store_scalar(g, m + r, n + c, (int64_t)count[r][c]);
}

static void block_portable(const struct gemm *g, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const int masked)
{
    for (int64_t n = n0; n < n1; n += 4) {
        int64_t cols = min64(4, n1 - n);
        for (int64_t m = m0; m < m1; m += MR) {
            int64_t rows = min64(MR, m1 - m);
            if (rows == MR && cols == 4) {
                tile_portable(g, m, n, MR, 4, masked);
            } else {
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t c = 0; c < cols; c++) tile_portable(g, m + r, n + c, 1, 1, masked);
            }
        }
    }
}

static void gemm_task_portable(void *p, int64_t t, int thread)
{
    const struct gemm *g = p;
    (void)thread;
    int64_t rb = t / g->n_panels, panel = t % g->n_panels;
    int64_t m0 = rb * g->row_block, m1 = min64(m0 + g->row_block, g->m);
    int64_t n0 = panel * NR, n1 = min64(n0 + NR, g->n);
    if (g->mask) block_portable(g, m0, m1, n0, n1, 1);
    else block_portable(g, m0, m1, n0, n1, 0);
}

#ifdef DITQ_X86
/* The first n of 16 lanes (none for n <= 0). */
static __mmask16 lane_mask(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

/* AVX-512: the 32 columns of a panel are laid out word by word, panel[w * 32 + j] = B[n0 + j][w], so
 * one broadcast word of A meets 32 columns in 4 vectors and each 64-bit lane keeps its own count. */
DITQ_AVX512 static inline __attribute__((always_inline)) void
tile_avx512(const struct gemm *g, const uint64_t *panel, int64_t m, const int rows, const int masked,
            int64_t n0, int64_t cols)
{
    __m512i count[MR][4];
    const int64_t words = g->words;
    const uint64_t *a = g->a + m * words;
    const uint64_t *keep = masked ? g->mask + m * words : NULL;
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < 4; v++) count[r][v] = _mm512_setzero_si512();
    for (int64_t w = 0; w < words; w++) {
        const __m512i *bw = (const __m512i *)(panel + w * NR);
        __m512i b[4] = { _mm512_load_si512(bw), _mm512_load_si512(bw + 1), _mm512_load_si512(bw + 2),
                         _mm512_load_si512(bw + 3) };
        for (int r = 0; r < rows; r++) {
            __m512i ar = _mm512_set1_epi64((long long)a[r * words + w]);
            if (masked) {
                __m512i kr = _mm512_set1_epi64((long long)keep[r * words + w]);
                for (int v = 0; v < 4; v++)   /* 0x28: (A xor B) and C */
                    count[r][v] = _mm512_add_epi64(
                        count[r][v], _mm512_popcnt_epi64(_mm512_ternarylogic_epi64(ar, b[v], kr, 0x28)));
            } else {
                for (int v = 0; v < 4; v++)
                    count[r][v] = _mm512_add_epi64(count[r][v], _mm512_popcnt_epi64(_mm512_xor_si512(ar, b[v])));
            }
        }
    }
    /* Epilogue. Everything read from g is copied to locals first: the vector stores may alias anything,
     * which would otherwise make the compiler reload it after every store. */
    const __m512i low_halves = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const int full = cols == NR;
    const __mmask16 lanes[2] = { lane_mask(cols), lane_mask(cols - 16) };
    const int64_t ld = g->n;
    int32_t *const acc_out = g->acc ? g->acc + m * ld + n0 : NULL;
    float *const y_out = g->y ? g->y + m * ld + n0 : NULL;
    const float *const row_scale = g->row_scale ? g->row_scale + m : NULL;
    const int has_col_scale = g->col_scale != NULL, has_bias = g->bias != NULL;
    __m512 col_scale[2], bias[2];
    for (int h = 0; h < 2; h++) {
        col_scale[h] = g->col_scale ? _mm512_maskz_loadu_ps(lanes[h], g->col_scale + n0 + 16 * h) : _mm512_set1_ps(1);
        bias[h] = g->bias ? _mm512_maskz_loadu_ps(lanes[h], g->bias + n0 + 16 * h) : _mm512_setzero_ps();
    }
    int32_t valid[MR];
    for (int r = 0; r < rows; r++) valid[r] = (int32_t)valid_bits(g, m + r);
    __m512i acc[MR][2];
    for (int r = 0; r < rows; r++) {
        for (int h = 0; h < 2; h++) {
            /* the low halves of two vectors of 64-bit counts -> 16 int32 counts, one per column */
            __m512i c = _mm512_permutex2var_epi32(count[r][2 * h], low_halves, count[r][2 * h + 1]);
            acc[r][h] = _mm512_sub_epi32(_mm512_set1_epi32(valid[r]), _mm512_slli_epi32(c, 1));
        }
    }
    if (acc_out) {
        for (int r = 0; r < rows; r++) {
            for (int h = 0; h < 2; h++) {
                int32_t *out = acc_out + r * ld + 16 * h;
                if (full) _mm512_storeu_si512(out, acc[r][h]);
                else _mm512_mask_storeu_epi32(out, lanes[h], acc[r][h]);
            }
        }
        return;
    }
    /* the reference's order: ((acc * row_scale) * col_scale) + bias; absent terms are skipped */
    for (int r = 0; r < rows; r++) {
        for (int h = 0; h < 2; h++) {
            __m512 y = _mm512_cvtepi32_ps(acc[r][h]);
            if (row_scale) y = _mm512_mul_ps(y, _mm512_set1_ps(row_scale[r]));
            if (has_col_scale) y = _mm512_mul_ps(y, col_scale[h]);
            if (has_bias) y = _mm512_add_ps(y, bias[h]);
            float *out = y_out + r * ld + 16 * h;
            if (full) _mm512_storeu_ps(out, y);
            else _mm512_mask_storeu_ps(out, lanes[h], y);
        }
    }
}

DITQ_AVX512 static void block_avx512(const struct gemm *g, const uint64_t *panel, int64_t m0, int64_t m1,
                                     int64_t n0, int64_t cols, const int masked)
{
    int64_t m = m0;
    for (; m + MR <= m1; m += MR) tile_avx512(g, panel, m, MR, masked, n0, cols);
    for (; m < m1; m++) tile_avx512(g, panel, m, 1, masked, n0, cols);
}

DITQ_AVX512 static void gemm_task_avx512(void *p, int64_t t, int thread)
{
    const struct gemm *g = p;
    int64_t rb = t / g->n_panels, p_index = t % g->n_panels;
    int64_t m0 = rb * g->row_block, m1 = min64(m0 + g->row_block, g->m);
    int64_t n0 = p_index * NR, cols = min64(NR, g->n - n0);
    uint64_t *panel = g->scratch[thread];
    for (int64_t j = 0; j < NR; j++) {   /* columns past N are zero words; their results are not stored */
        const uint64_t *src = g->b + (n0 + j) * g->words;
        for (int64_t w = 0; w < g->words; w++) panel[w * NR + j] = j < cols ? src[w] : 0;
    }
    if (g->mask) block_avx512(g, panel, m0, m1, n0, cols, 1);
    else block_avx512(g, panel, m0, m1, n0, cols, 0);
}
#endif

/* a (m, words), b (n, words), mask (m, words) or NULL with valid (m); exactly one of acc / y. */
int ditq_binary_gemm(const uint64_t *a, const uint64_t *mask, const int32_t *valid, const uint64_t *b,
                     int64_t m, int64_t n, int64_t words, int64_t k, int32_t *acc, float *y,
                     const float *row_scale, const float *col_scale, const float *bias, int isa, int threads)
{
    if (m < 0 || n < 0 || words < 1 || k < 1 || k > 64 * words || (!acc) == (!y) || (!mask) != (!valid))
        return DITQ_ERR_ARG;
    isa = resolve_isa(isa);
    if (isa < 0) return DITQ_ERR_ISA;
    if (m == 0 || n == 0) return DITQ_OK;
    threads = threads_for(threads, m * n * words, (int64_t)1 << 19);   /* word pairs: ~25 us of work each */
    struct gemm g = { a, mask, b, valid, m, n, words, k, acc, y, row_scale, col_scale, bias, 0, 0, 0, NULL };
    int64_t row_bytes = words * 8 * (mask ? 2 : 1);
    g.n_panels = (n + NR - 1) / NR;
    g.row_block = max64(MR, ROW_BLOCK_BYTES / row_bytes / MR * MR);
    /* enough tasks to keep every thread busy: at least 4 per thread when the panels alone are fewer */
    while (g.row_block > MR && ((m + g.row_block - 1) / g.row_block) * g.n_panels < 4 * (int64_t)threads)
        g.row_block = max64(MR, g.row_block / 2 / MR * MR);
    g.n_row_blocks = (m + g.row_block - 1) / g.row_block;
    int64_t n_tasks = g.n_row_blocks * g.n_panels;
#ifdef DITQ_X86
    if (isa == ISA_AVX512) {
        int used = (int)min64(threads, n_tasks);
        uint64_t *buffers[256];
        if (used > 256) used = 256;
        int ok = 1;
        for (int i = 0; i < used; i++) {
            size_t bytes = (size_t)((words * NR * 8 + 63) / 64 * 64);
            buffers[i] = aligned_alloc(64, bytes);
            ok = ok && buffers[i];
        }
        if (ok) {
            g.scratch = buffers;
            parallel_for(n_tasks, used, gemm_task_avx512, &g);
        }
        for (int i = 0; i < used; i++) free(buffers[i]);
        return ok ? DITQ_OK : DITQ_ERR_ALLOC;
    }
#endif
    parallel_for(n_tasks, threads, gemm_task_portable, &g);
    return DITQ_OK;
}

/* ---------------------------------------------------------------- im2col */

struct im2col {
    const uint64_t *x;              /* (batch, h, w, wc) packed channel words */
    int64_t h, w, wc, channels, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, rows, rows_per_task;
    uint64_t *a, *mask;             /* (rows, kh * kw * wc) */
    int32_t *valid;
};

static void im2col_task(void *p, int64_t t, int thread)
{
    const struct im2col *g = p;
    (void)thread;
    int64_t row_words = g->kh * g->kw * g->wc;
    for (int64_t row = t * g->rows_per_task; row < min64((t + 1) * g->rows_per_task, g->rows); row++) {
        int64_t b = row / (g->oh * g->ow), oy = row / g->ow % g->oh, ox = row % g->ow;
        uint64_t *a = g->a + row * row_words;
        uint64_t *keep = g->mask ? g->mask + row * row_words : NULL;
        int64_t inside = 0;
        for (int64_t i = 0; i < g->kh; i++) {
            for (int64_t j = 0; j < g->kw; j++) {
                int64_t iy = oy * g->sh - g->ph + i * g->dh, ix = ox * g->sw - g->pw + j * g->dw;
                int64_t at = (i * g->kw + j) * g->wc;
                int in = iy >= 0 && iy < g->h && ix >= 0 && ix < g->w;
                if (in) memcpy(a + at, g->x + ((b * g->h + iy) * g->w + ix) * g->wc, (size_t)g->wc * 8);
                else memset(a + at, 0, (size_t)g->wc * 8);
                if (keep) memset(keep + at, in ? 0xFF : 0, (size_t)g->wc * 8);
                inside += in;
            }
        }
        g->valid[row] = (int32_t)(inside * g->channels);
    }
}

/* Rows (batch * oh * ow, kh * kw * wc) of packed input words per output pixel, in (i, j, word) order;
 * positions in the zero padding get zero words, zero mask words (mask may be NULL when there is no
 * padding) and do not count in valid. */
int ditq_binary_im2col(const uint64_t *x, int64_t batch, int64_t h, int64_t w, int64_t wc, int64_t channels,
                       int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                       int64_t dw, int64_t oh, int64_t ow, uint64_t *a, uint64_t *mask, int32_t *valid, int threads)
{
    if (batch < 0 || h < 1 || w < 1 || wc < 1 || channels < 1 || channels > 64 * wc || kh < 1 || kw < 1 ||
        sh < 1 || sw < 1 || ph < 0 || pw < 0 || dh < 1 || dw < 1 || oh < 1 || ow < 1)
        return DITQ_ERR_ARG;
    struct im2col g = { x, h, w, wc, channels, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, batch * oh * ow, 0,
                        a, mask, valid };
    g.rows_per_task = max64(1, 4096 / (kh * kw * wc));
    threads = threads_for(threads, g.rows * kh * kw * wc, (int64_t)1 << 18);
    parallel_for((g.rows + g.rows_per_task - 1) / g.rows_per_task, threads, im2col_task, &g);
    return DITQ_OK;
}

/* ----------------------------------------------------------------- probe */

/* The popcount peak: `threads` threads each run `iters` rounds of 12 independent popcount chains
 * (register to register, nothing else in the loop; the empty asm keeps the values in registers and
 * the loop from being folded). Returns popcount instructions per thread; bits per instruction: 512
 * (AVX-512 path) or 64 (portable). The caller times the call. */
struct probe { int64_t iters; uint64_t sink[256]; };

#define PROBE_CHAINS 12
#define PROBE_ROUND(POP, C)                                                                            \
    do {                                                                                               \
        v0 = POP(v0); v1 = POP(v1); v2 = POP(v2); v3 = POP(v3); v4 = POP(v4); v5 = POP(v5);             \
        v6 = POP(v6); v7 = POP(v7); v8 = POP(v8); v9 = POP(v9); v10 = POP(v10); v11 = POP(v11);         \
        __asm__ volatile("" : "+" C(v0), "+" C(v1), "+" C(v2), "+" C(v3), "+" C(v4), "+" C(v5));         \
        __asm__ volatile("" : "+" C(v6), "+" C(v7), "+" C(v8), "+" C(v9), "+" C(v10), "+" C(v11));       \
    } while (0)

static uint64_t popcount_u64(uint64_t v) { return (uint64_t)__builtin_popcountll(v); }

static void probe_task_portable(void *p, int64_t t, int thread)
{
    struct probe *g = p;
    uint64_t seed = (uint64_t)t * 0x9E3779B97F4A7C15ull;
    uint64_t v0 = seed, v1 = seed + 1, v2 = seed + 2, v3 = seed + 3, v4 = seed + 4, v5 = seed + 5;
    uint64_t v6 = seed + 6, v7 = seed + 7, v8 = seed + 8, v9 = seed + 9, v10 = seed + 10, v11 = seed + 11;
    for (int64_t it = 0; it < g->iters; it++) PROBE_ROUND(popcount_u64, "r");
    g->sink[thread & 255] += v0 + v1 + v2 + v3 + v4 + v5 + v6 + v7 + v8 + v9 + v10 + v11;
}

#ifdef DITQ_X86
DITQ_AVX512 static void probe_task_avx512(void *p, int64_t t, int thread)
{
    struct probe *g = p;
    __m512i v0 = _mm512_set1_epi64(t), v1 = _mm512_set1_epi64(t + 1), v2 = _mm512_set1_epi64(t + 2);
    __m512i v3 = _mm512_set1_epi64(t + 3), v4 = _mm512_set1_epi64(t + 4), v5 = _mm512_set1_epi64(t + 5);
    __m512i v6 = _mm512_set1_epi64(t + 6), v7 = _mm512_set1_epi64(t + 7), v8 = _mm512_set1_epi64(t + 8);
    __m512i v9 = _mm512_set1_epi64(t + 9), v10 = _mm512_set1_epi64(t + 10), v11 = _mm512_set1_epi64(t + 11);
    for (int64_t it = 0; it < g->iters; it++) PROBE_ROUND(_mm512_popcnt_epi64, "v");
    __m512i s = _mm512_add_epi64(_mm512_add_epi64(_mm512_add_epi64(v0, v1), _mm512_add_epi64(v2, v3)),
                                 _mm512_add_epi64(_mm512_add_epi64(v4, v5), _mm512_add_epi64(v6, v7)));
    s = _mm512_add_epi64(s, _mm512_add_epi64(_mm512_add_epi64(v8, v9), _mm512_add_epi64(v10, v11)));
    g->sink[thread & 255] += (uint64_t)_mm512_reduce_add_epi64(s);
}
#endif

int64_t ditq_popcount_probe(int64_t iters, int isa, int threads)
{
    struct probe g = { iters, { 0 } };
    isa = resolve_isa(isa);
    if (isa < 0) return DITQ_ERR_ISA;
#ifdef DITQ_X86
    if (isa == ISA_AVX512) {
        parallel_for(threads, threads, probe_task_avx512, &g);
        return iters * PROBE_CHAINS;
    }
#endif
    parallel_for(threads, threads, probe_task_portable, &g);
    return iters * PROBE_CHAINS;
}

/* The clock: a chain of 8 x iters dependent one-cycle adds (the empty asm keeps each add, and the chain,
 * from being folded), so iters x 8 / time is the clock the core runs at, boost included. */
int64_t ditq_cycle_probe(int64_t iters)
{
    uint64_t x = 0;
    for (int64_t i = 0; i < iters; i++) {
        x += 1; __asm__ volatile("" : "+r"(x)); x += 1; __asm__ volatile("" : "+r"(x));
        x += 1; __asm__ volatile("" : "+r"(x)); x += 1; __asm__ volatile("" : "+r"(x));
        x += 1; __asm__ volatile("" : "+r"(x)); x += 1; __asm__ volatile("" : "+r"(x));
        x += 1; __asm__ volatile("" : "+r"(x)); x += 1; __asm__ volatile("" : "+r"(x));
    }
    return (int64_t)x;
}
