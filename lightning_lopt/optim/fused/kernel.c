/* The fused CPU step of small_fc_lopt / μLO and of Celo's per-parameter MLP rule, and the
 * elementwise part of Celo2's (its MLP output d; Newton–Schulz, the output normalisation and the
 * update stay in torch, lightning_lopt/optim/fused/celo2.py).
 *
 * Built at first use by lightning_lopt/optim/fused/build.py (C11 with GNU vector extensions and
 * OpenMP, no torch headers), once per instruction set: the vector width follows the -m flags
 * (AVX-512: 16 lanes, AVX2 + FMA: 8, otherwise 4). Python passes raw pointers of contiguous
 * tensors through ctypes (driver.py mirrors the descriptor layout below).
 *
 * One call computes, for every (particle, tensor) "job", the pure step of
 * lightning_lopt/optim/functional/{small_fc,celo}.py (docs/reference/small_fc.md, docs/reference/celo.md#one-update,
 * docs/reference/celo.md#per-parameter-features), in phases
 * separated by barriers:
 *
 *   RED    factored tensors: the means of G = g² + 1e-30 over the two factored axes;
 *   TABLE  factored tensors: the new v_row / v_col (written to the state), the mean of v_row over
 *          d1, per statistic entry v, rsqrt(v + 1e-8) and the row or column factor (3 decays each),
 *          and the mean squares of the 12 channels broadcast from them;
 *   STATS  the mean square of every per-element MLP input (the second-moment normalisation);
 *   FIN    the first layer with the normalisation folded into its columns; for factored tensors the
 *          first-layer contribution of the 12 broadcast channels per statistic entry (a
 *          "projection" table, or per line when the statistic is constant along it); Celo's RMS(p);
 *   APPLY  rebuild the per-element inputs of a block of E elements, run the MLP on it while it sits
 *          in L1 and registers (the projection enters as the first layer's bias), write p, m, rms
 *          (and v for vectors).
 *
 * Determinism: every reduction is split into work units whose boundaries depend only on the
 * shapes, each unit is reduced in a fixed order, and partial results are combined in unit order;
 * which tensors get a projection table also depends on the shapes only. Threads only decide who
 * computes a unit, so every thread count gives bit-identical numbers.
 *
 * Celo2 (RULE_CELO2, docs/reference/celo2.md#one-step): Celo's features with rsqrt(rms + 1e-8),
 * 15 inputs for vectors, the 30→8→8→3 MLP, input normalisation with eps 1e-9 over the tensor's
 * matrix axes, per slice of the others: a job whose slices number more than one is "grouped"
 * (descriptor T_GX, T_GY, T_GZ: the tensor as [GX][GY][GZ], one slice per (x, z), the statistic a
 * mean over y), its STATS units are stripes of slices over all their rows, and APPLY multiplies
 * the MLP inputs by their slice's factors. It projects only when its factored axes are its matrix
 * axes (each table entry then lies in one slice, whose factors the projection takes; TABLE gives
 * the broadcast channels' mean squares per slice). APPLY writes d to p_out. FINISH: a Celo2 job given
 * a nonzero scale or weight decay (the caller hands over small tensors that take no Newton–Schulz)
 * is also normalised as a whole and stepped here, p ← p − (scale·d·rsqrt(1e-9 + mean d²) + wd·p),
 * in place of three torch passes per tensor that cost more than the arithmetic on small tensors.
 *
 * Memory: besides the outputs, a call allocates (lopt_workspace_bytes reports the total) the
 * statistics tables (36 bytes per entry of v_row and v_col), reduction partials (at most n/256
 * floats plus one per entry), 30 doubles per unit of CHUNK elements, projection tables (4·H bytes
 * per entry, within max(2% of the parameter bytes, PROJ_MIN_BYTES); tensors beyond take the
 * unprojected path) and a normalised first layer per job.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define VL 16
#define OT_DEFAULT 8
#elif defined(__AVX2__) && defined(__FMA__)
#define VL 8
#define OT_DEFAULT 4
#else
#define VL 4
#define OT_DEFAULT 4
#endif
/* Register tile of the MLP: OT_WIDE outputs x NV vectors of accumulators; E = NV·VL elements go
 * through the MLP together. */
#ifndef OT_WIDE
#define OT_WIDE OT_DEFAULT
#endif
#ifndef NV
#define NV 2
#endif
#define E (NV * VL)

#define CHUNK 16384     /* elements per work unit of the element passes (a multiple of E) */
#define ZSTRIPE 1024    /* columns per unit of a strided reduction */
#define YMIN 256        /* least rows per unit of a split strided reduction: partials ≤ n/256 */

#define RULE_SMALL_FC 0
#define RULE_CELO 1
#define RULE_CELO2 2
#define MAX_F 30        /* MLP inputs: 28 (small_fc, time features folded into the bias) or 30 */
#define MAX_H 32
#define NQ 9            /* values per statistic entry in a table: v, rsqrt(v + 1e-8), factor, x3 */
#ifndef PROJ_MIN_BYTES
#define PROJ_MIN_BYTES (32 << 20) /* projections may use max(2% of the parameter bytes, this) */
#endif

/* X row order. Rows [0, ada) are the spec's channels [0, ada) (ada = 13 small_fc, 15 Celo); rows
 * ada..ada+2 are m·row·col (the spec's last 3 channels); rows ada+3..F-1 the 12 Adafactor broadcast
 * channels (spec ada..ada+11: v_row, v_col, rsqrt(v_row + 1e-8), rsqrt(v_col + 1e-8)). The first
 * NE = ada + 3 rows vary per element; the last 12 only per statistic entry, so for factored tensors
 * their first-layer contribution is a per-entry (or per-line) bias: the "projection". */
static inline int spec_channel(int row, int ada) {
    return row < ada ? row : (row < ada + 3 ? row + 12 : row - 3);
}

typedef float vf __attribute__((vector_size(4 * VL)));
typedef float vfu __attribute__((vector_size(4 * VL), aligned(4))); /* for unaligned loads */

/* A broadcast load. Not `(vf){0} + x`: adding +0.0 is not a no-op for -0.0, so gcc would emit a
 * scalar add before every broadcast in the MLP's inner loop. */
#if defined(__AVX512F__)
#define SPLAT(x) ((vf)_mm512_set1_ps(x))
#elif defined(__AVX2__) && defined(__FMA__)
#define SPLAT(x) ((vf)_mm256_set1_ps(x))
#elif defined(__SSE2__)
#define SPLAT(x) ((vf)_mm_set1_ps(x))
#else
static inline vf splat_generic(float x) {
    vf v;
    for (int i = 0; i < VL; i++) v[i] = x;
    return v;
}
#define SPLAT(x) splat_generic(x)
#endif

/* Field order of one tensor descriptor (int64), mirrored by driver.py. */
enum {
    T_N, T_FACTORED, T_PRE, T_A, T_MID, T_B, T_POST, T_D0_IS_A,
    T_P_IN, T_P_OUT, T_G, T_M_IN, T_M_OUT, T_RMS_IN, T_RMS_OUT,
    T_VROW_IN, T_VROW_OUT, T_VCOL_IN, T_VCOL_OUT,
    T_INDEX, /* position in the step's tensor list: keys the stochastic rounding of bf16 state */
    T_GX, T_GY, T_GZ, /* Celo2: the normalisation view (slices (x, z), mean over y); else 1, n, 1 */
    /* Sharded steps (phases 1-3): the tensor's rank's block of rows of axis 0. */
    T_N_TOTAL,   /* elements of the whole tensor (= T_N for one process) */
    T_A_TOTAL,   /* axis a of the whole tensor (= T_A unless axis a is the split axis 0) */
    T_SPLIT_A,   /* 1 if axis a is the split axis 0 (pre == 1): table a is then replicated */
    T_COUNT
};

/* One call. Per-particle arrays have a leading axis of n_particles. */
typedef struct {
    int32_t rule, n_particles, n_tensors, n_threads, state_bf16, hidden;
    const int64_t *tensors;   /* [n_tensors][T_COUNT] */
    const float *tscale;      /* [n_tensors][2]: update scale s_p·lr, weight decay lr·wd */
    const float *w0, *b0;     /* [P][H][F] (small_fc: the 28 tensor-feature columns), [P][H] */
    const float *w1, *b1;     /* [P][H][H], [P][H] */
    const float *w2, *b2;     /* [P][O][H], [P][O]: O = 2 (small_fc) or 3 (Celo, Celo2; unused) */
    const float *decays;      /* [P][7]: momentum (3), rms (1), adafactor (3), as in θ */
    const float *lr;          /* [P]: small_fc step_mult; Celo η·1e-3 (1e-3 in stage 1); Celo2 unused */
    const uint32_t *seed;     /* [P]: the iteration, keys the stochastic rounding of bf16 state */
    float exp_mult;
} lopt_call;

typedef struct {
    int64_t X, Y, Z, zs, nzs, xc, nxc, yc, nyc, n_units;
    float *part; /* [X][nyc][Z] sums over y-chunks */
} red_t;

typedef struct {
    int64_t n, pre, A, mid, B, post, L, na, nb, nbatch, n_units;
    int factored, d0_is_a, particle;
    const float *p_in, *g;
    float *p_out;
    const void *m_in, *rms_in;
    void *m_out, *rms_out;
    const float *vrow_in, *vcol_in;   /* non-factored: v in vrow_* */
    float *vrow_out, *vcol_out;
    float scale, wd;
    uint32_t key;
    double n_total, a_total;          /* whole-tensor counts (phases 1-3 of a sharded step) */
    int split_a;
    int64_t x1_off, x2_off;           /* offsets of the job's slots in the exchanged sums */
    red_t ra, rb;                     /* reductions over axis a and axis b */
    float *tab_a, *tab_b;             /* [NQ][na], [NQ][nb] */
    double *rbar;                     /* [nbatch][3] */
    double *sums;                     /* [n_units][F]; grouped: [ngroups][F] */
    int grouped;                      /* Celo2 with more than one normalisation slice */
    int64_t gx, gy, gz, n_sunits;     /* grouped: the view and its STATS units (else n_units) */
    float *ginv;                      /* grouped: [ngroups][F] normalisation factors */
    double *gtmean;                   /* grouped and projected: [ngroups][12], as tmean per slice */
    int k0;                           /* MLP inputs read from X (fewer when projected or Celo2 vectors) */
    double tmean[12];                 /* factored: mean square of the 12 broadcast channels */
    float *w0n;                       /* [H][F]: first layer, columns in X row order, normalised */
    int proj;                         /* factored: broadcast channels folded into a bias */
    float *pa, *pb;                   /* proj: [H][na], and [H][nb] if post > 1 */
    float pscale;
} job_t;

typedef struct {
    const lopt_call *c;
    int F, H, NE;   /* MLP inputs, hidden width, per-element inputs (X rows before the broadcast ones) */
    int64_t n_jobs, n_red_units, n_elem_units, n_stat_units;
    int64_t n_x1, n_x2;   /* lengths of the sums a sharded step exchanges after phases 1 and 2 */
    job_t *jobs;
    int64_t *red_start;   /* [n_jobs + 1] prefix of reduction units */
    int64_t *elem_start;  /* [n_jobs + 1] prefix of element units (APPLY) */
    int64_t *stat_start;  /* [n_jobs + 1] prefix of STATS units (the element units, or a grouped job's) */
    char *ws;
    size_t ws_bytes;
} plan_t;

static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

/* ---------------------------------------------------------------------------------------------
 * Scalar helpers (written as per-lane loops over E so that gcc vectorises them).
 * ------------------------------------------------------------------------------------------- */

static inline float as_float(uint32_t u) { union { uint32_t u; float f; } x = {u}; return x.f; }
static inline uint32_t as_bits(float f) { union { float f; uint32_t u; } x = {f}; return x.u; }

/* nan_to_num (NaN → 0, ±inf → ±FLT_MAX), then Celo's clip to [-1000, 1000]. */
static inline float clean_grad(float x, int celo) {
    const float hi = celo ? 1000.0f : FLT_MAX;
    x = x != x ? 0.0f : x;
    return x > hi ? hi : (x < -hi ? -hi : x);
}

static inline float rsqrt_exact(float x) { return 1.0f / sqrtf(x); }

/* expf to about 1 ulp (Cephes' polynomial), branch-free so that the lane loop vectorises. */
static inline float exp_poly(float x) {
    x = x > 88.3762626647949f ? 88.3762626647949f : x;
    x = x < -87.3365447505531f ? -87.3365447505531f : x;
    float t = x * 1.44269504088896341f + 0.5f;
    int32_t i = (int32_t)t;
    i -= (float)i > t;                       /* floor */
    float fi = (float)i;
    x = x - fi * 0.693359375f;
    x = x - fi * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * x * x + x + 1.0f;
    return y * as_float((uint32_t)(i + 127) << 23);
}

/* The stochastic rounding of bf16 state (mirrored by lightning_lopt/optim/fused/bf16_state.py):
 * the 16 dropped mantissa bits are compared with a hash of (iteration, tensor, element, channel),
 * so the rounding is unbiased, reproducible and independent of the thread count. */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x21f0aaadU;
    x ^= x >> 15;
    return x;
}

static inline uint16_t to_bf16(float f, uint32_t key, uint32_t index) {
    uint32_t bits = as_bits(f);
    if ((bits & 0x7f800000U) == 0x7f800000U)              /* inf stays inf, NaN becomes qNaN */
        return (bits & 0x007fffffU) ? (uint16_t)((bits >> 16) | 0x0040U) : (uint16_t)(bits >> 16);
    return (uint16_t)((bits + (mix32(key ^ index) & 0xffffU)) >> 16);
}

static inline float from_bf16(uint16_t h) { return as_float((uint32_t)h << 16); }

/* ---------------------------------------------------------------------------------------------
 * RED: mean of G = g² + 1e-30 over the middle axis of a [X][Y][Z] view of the gradient.
 * ------------------------------------------------------------------------------------------- */

static void red_plan(red_t *r, int64_t X, int64_t Y, int64_t Z) {
    r->X = X; r->Y = Y; r->Z = Z;
    if (X * Y * Z == 0) { /* an empty local block of a sharded tensor: no units, no partials */
        r->zs = r->nzs = r->xc = r->nxc = r->yc = r->nyc = r->n_units = 0;
        return;
    }
    r->zs = imin(Z, ZSTRIPE);
    r->nzs = cdiv(Z, r->zs);
    if (Y * r->zs <= CHUNK) {
        r->yc = Y;
        r->xc = imax(1, CHUNK / (Y * r->zs));
    } else {
        r->xc = 1;
        r->yc = imin(Y, imax(YMIN, CHUNK / r->zs));
    }
    r->nyc = cdiv(Y, r->yc);
    r->nxc = cdiv(X, r->xc);
    r->n_units = r->nxc * r->nzs * r->nyc;
}

static inline float gsq(float x, int celo) {
    float c = clean_grad(x, celo);
    return c * c + 1e-30f;
}

static void red_unit(const red_t *r, int64_t u, const float *g, int celo) {
    const int64_t ci = u % r->nyc, t = u / r->nyc, si = t % r->nzs, xi = t / r->nzs;
    const int64_t z0 = si * r->zs, z1 = imin(r->Z, z0 + r->zs);
    const int64_t y0 = ci * r->yc, y1 = imin(r->Y, y0 + r->yc);
    const int64_t x0 = xi * r->xc, x1 = imin(r->X, x0 + r->xc);
    for (int64_t x = x0; x < x1; x++) {
        float *out = r->part + (x * r->nyc + ci) * r->Z;
        if (r->Z == 1) {
            /* A contiguous run: E lane sums, then the lanes in order. */
            const float *row = g + x * r->Y;
            float lanes[E] = {0};
            int64_t y = y0;
            for (; y + E <= y1; y += E)
                for (int k = 0; k < E; k++) lanes[k] += gsq(row[y + k], celo);
            float s = 0.0f;
            for (int k = 0; k < E; k++) s += lanes[k];
            for (; y < y1; y++) s += gsq(row[y], celo);
            out[0] = s;
        } else {
            float acc[ZSTRIPE];
            const int64_t w = z1 - z0;
            for (int64_t k = 0; k < w; k++) acc[k] = 0.0f;
            for (int64_t y = y0; y < y1; y++) {
                const float *row = g + (x * r->Y + y) * r->Z + z0;
                for (int64_t k = 0; k < w; k++) acc[k] += gsq(row[k], celo);
            }
            for (int64_t k = 0; k < w; k++) out[z0 + k] = acc[k];
        }
    }
}

/* mean over y of the reduction, for output (x, z). */
static inline float red_mean(const red_t *r, int64_t x, int64_t z) {
    double s = 0.0;
    for (int64_t c = 0; c < r->nyc; c++) s += r->part[(x * r->nyc + c) * r->Z + z];
    return (float)(s / (double)r->Y);
}

/* ---------------------------------------------------------------------------------------------
 * TABLE: new factored statistics and the per-entry values of the features.
 * Table a holds the statistic without axis a, indexed [pre][mid][B][post]; table b the one
 * without axis b, indexed [pre][A][mid][post]. v_row is the one without d0, v_col without d1.
 * ------------------------------------------------------------------------------------------- */

/* The batch index (pre, mid, post) of entry e of the row statistic. */
static inline int64_t batch_index(const job_t *J, int64_t e) {
    const int64_t ipost = e % J->post;
    int64_t t = e / J->post, imid, ipre;
    if (J->d0_is_a) { /* [pre][mid][B][post] */
        t /= J->B; imid = t % J->mid; ipre = t / J->mid;
    } else {          /* [pre][A][mid][post] */
        imid = t % J->mid; t /= J->mid; ipre = t / J->A;
    }
    return (ipre * J->mid + imid) * J->post + ipost;
}

/* Rows 3..8 of the tables from their new v (rows 0..2) and r̄: rsqrt(v + 1e-8) and the factors. */
static void table_factors(const job_t *J, float *trow, float *tcol, int64_t nrow, int64_t ncol) {
    for (int64_t e = 0; e < nrow; e++) {
        const int64_t bi = batch_index(J, e);
        for (int j = 0; j < 3; j++) {
            const float v = trow[j * nrow + e];
            const float ratio = v / ((float)J->rbar[3 * bi + j] + 1e-9f);
            trow[(3 + j) * nrow + e] = rsqrt_exact(v + 1e-8f);
            trow[(6 + j) * nrow + e] = rsqrt_exact(ratio > 1e-9f ? ratio : 1e-9f);
        }
    }
    for (int64_t e = 0; e < ncol; e++) {
        for (int j = 0; j < 3; j++) {
            const float v = tcol[j * ncol + e];
            tcol[(3 + j) * ncol + e] = rsqrt_exact(v + 1e-8f);
            tcol[(6 + j) * ncol + e] = rsqrt_exact(v > 1e-9f ? v : 1e-9f);
        }
    }
}

/* The slice of entry e of table a (table_a) or b of a grouped, projected job: its factored axes are
 * its matrix axes (mid == 1, slices (pre, post)). */
static inline int64_t entry_slice(const job_t *J, int64_t e, int table_a) {
    const int64_t per = (table_a ? J->B : J->A) * J->post;
    return (e / per) * J->post + e % J->post;
}

static void table_job(const plan_t *pl, job_t *J) {
    const float *d = pl->c->decays + 7 * J->particle;
    float fd[3];
    for (int j = 0; j < 3; j++) fd[j] = d[4 + j] < 0.0f ? 0.0f : (d[4 + j] > 1.0f ? 1.0f : d[4 + j]);
    const int64_t A = J->A, mid = J->mid, B = J->B, post = J->post;
    /* Row statistic: table a if d0 is axis a. Its mean over d1 (axis b, or a) is per (pre, mid, post). */
    float *trow = J->d0_is_a ? J->tab_a : J->tab_b;
    float *tcol = J->d0_is_a ? J->tab_b : J->tab_a;
    const int64_t nrow = J->d0_is_a ? J->na : J->nb, ncol = J->d0_is_a ? J->nb : J->na;
    /* Table a: entries [pre][mid][B][post], the mean over a of reduction ra at (pre, (mid,B,post)). */
    for (int64_t e = 0; e < J->na; e++) {
        const int64_t x = e / (mid * B * post), z = e % (mid * B * post);
        const float mean = red_mean(&J->ra, x, z);
        const float *vin = J->d0_is_a ? J->vrow_in : J->vcol_in;
        float *vout = J->d0_is_a ? J->vrow_out : J->vcol_out;
        for (int j = 0; j < 3; j++) {
            const float v = fd[j] * vin[3 * e + j] + (1.0f - fd[j]) * mean;
            vout[3 * e + j] = v;
            J->tab_a[j * J->na + e] = v;
        }
    }
    /* Table b: entries [pre][A][mid][post] = reduction rb at ((pre,A,mid), post). */
    for (int64_t e = 0; e < J->nb; e++) {
        const int64_t x = e / post, z = e % post;
        const float mean = red_mean(&J->rb, x, z);
        const float *vin = J->d0_is_a ? J->vcol_in : J->vrow_in;
        float *vout = J->d0_is_a ? J->vcol_out : J->vrow_out;
        for (int j = 0; j < 3; j++) {
            const float v = fd[j] * vin[3 * e + j] + (1.0f - fd[j]) * mean;
            vout[3 * e + j] = v;
            J->tab_b[j * J->nb + e] = v;
        }
    }
    /* r̄ = mean of v_row over its d1 axis, per batch index (pre, mid, post), summed in order. */
    const int64_t nbatch = J->nbatch, span = J->d0_is_a ? B : A;
    for (int64_t q = 0; q < nbatch * 3; q++) J->rbar[q] = 0.0;
    for (int64_t e = 0; e < nrow; e++) {
        const int64_t bi = batch_index(J, e);
        for (int j = 0; j < 3; j++) J->rbar[3 * bi + j] += trow[j * nrow + e];
    }
    for (int64_t q = 0; q < nbatch * 3; q++) J->rbar[q] = (float)(J->rbar[q] / (double)span);
    table_factors(J, trow, tcol, nrow, ncol);
    /* Every entry is broadcast to the same number of elements, so the mean over elements of a
     * broadcast channel squared is its mean over entries. Order: X rows ada+3 .. ada+14. */
    for (int j = 0; j < 3; j++) {
        double sv_r = 0.0, sv_c = 0.0, sr_r = 0.0, sr_c = 0.0;
        for (int64_t e = 0; e < nrow; e++) {
            const double v = trow[j * nrow + e], r = trow[(3 + j) * nrow + e];
            sv_r += v * v; sr_r += r * r;
        }
        for (int64_t e = 0; e < ncol; e++) {
            const double v = tcol[j * ncol + e], r = tcol[(3 + j) * ncol + e];
            sv_c += v * v; sr_c += r * r;
        }
        J->tmean[j] = sv_r / (double)nrow;
        J->tmean[3 + j] = sv_c / (double)ncol;
        J->tmean[6 + j] = sr_r / (double)nrow;
        J->tmean[9 + j] = sr_c / (double)ncol;
    }
    if (J->grouped && J->proj) {
        /* Per slice (each table entry lies in one slice, and each slice has as many entries). */
        const int64_t ng = J->gx * J->gz;
        for (int64_t q = 0; q < ng * 12; q++) J->gtmean[q] = 0.0;
        for (int64_t e = 0; e < nrow; e++) {
            double *m = J->gtmean + entry_slice(J, e, J->d0_is_a) * 12;
            for (int j = 0; j < 3; j++) {
                const double v = trow[j * nrow + e], r = trow[(3 + j) * nrow + e];
                m[j] += v * v; m[6 + j] += r * r;
            }
        }
        for (int64_t e = 0; e < ncol; e++) {
            double *m = J->gtmean + entry_slice(J, e, !J->d0_is_a) * 12;
            for (int j = 0; j < 3; j++) {
                const double v = tcol[j * ncol + e], r = tcol[(3 + j) * ncol + e];
                m[3 + j] += v * v; m[9 + j] += r * r;
            }
        }
        for (int64_t q = 0; q < ng; q++)
            for (int j = 0; j < 3; j++) {
                J->gtmean[q * 12 + j] /= (double)(nrow / ng);
                J->gtmean[q * 12 + 6 + j] /= (double)(nrow / ng);
                J->gtmean[q * 12 + 3 + j] /= (double)(ncol / ng);
                J->gtmean[q * 12 + 9 + j] /= (double)(ncol / ng);
            }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Feature blocks. A block is E consecutive elements (the last one of a unit may be partial). For
 * factored tensors it is cut into segments along "lines": runs of the innermost axis (post if
 * post > 1, else b) along which table a advances by 1 and table b by 1 (post > 1) or 0.
 * ------------------------------------------------------------------------------------------- */

typedef struct { int64_t ipre, ia, imid, ib, off, base_a, base_b; } cursor_t;

static void cursor_bases(const job_t *J, cursor_t *c) {
    if (J->post > 1) {
        c->base_a = ((c->ipre * J->mid + c->imid) * J->B + c->ib) * J->post;
        c->base_b = ((c->ipre * J->A + c->ia) * J->mid + c->imid) * J->post;
    } else {
        c->base_a = (c->ipre * J->mid + c->imid) * J->B;
        c->base_b = (c->ipre * J->A + c->ia) * J->mid + c->imid;
    }
}

static void cursor_init(const job_t *J, cursor_t *c, int64_t e) {
    int64_t line = e / J->L;
    c->off = e % J->L;
    c->ib = 0;
    if (J->post > 1) { c->ib = line % J->B; line /= J->B; }
    c->imid = line % J->mid; line /= J->mid;
    c->ia = line % J->A;
    c->ipre = line / J->A;
    cursor_bases(J, c);
}

static void cursor_next_line(const job_t *J, cursor_t *c) {
    c->off = 0;
    if (J->post > 1 && ++c->ib < J->B) { cursor_bases(J, c); return; }
    c->ib = 0;
    if (++c->imid < J->mid) { cursor_bases(J, c); return; }
    c->imid = 0;
    if (++c->ia < J->A) { cursor_bases(J, c); return; }
    c->ia = 0;
    c->ipre++;
    cursor_bases(J, c);
}

typedef struct {
    float g[E], p[E], m[3][E], r[E], v[3][E];     /* cleaned g, p and the new accumulators */
    float row[NQ][E], col[NQ][E];                 /* table values per element (factored) */
} stage_t;

/* Copy cnt values (cnt ≤ E) and zero the rest, so that the lane loops below always run E lanes. */
static inline const float *padded(const float *src, int cnt, int width, float *pad) {
    if (cnt == E) return src;
    memset(pad, 0, sizeof(float) * (size_t)(E * width));
    memcpy(pad, src, sizeof(float) * (size_t)(cnt * width));
    return pad;
}

/* Gather the table values of the block's elements, segment by segment along the lines. */
/* Table values q0..NQ-1 (all, or only the factors when the broadcast channels are projected). */
static void gather_tables(const job_t *J, int cnt, cursor_t *cur, float (*restrict ta)[E], float (*restrict tb)[E],
                          const int q0) {
    if (cur->off == J->L) cursor_next_line(J, cur);
    if (cnt == E && J->L - cur->off >= E) {
        /* The common case: the whole block lies on one line. */
        for (int q = q0; q < NQ; q++) {
            const float *restrict src = J->tab_a + q * J->na + cur->base_a + cur->off;
            for (int k = 0; k < E; k++) ta[q][k] = src[k];
        }
        for (int q = q0; q < NQ; q++) {
            if (J->post > 1) {
                const float *restrict src = J->tab_b + q * J->nb + cur->base_b + cur->off;
                for (int k = 0; k < E; k++) tb[q][k] = src[k];
            } else {
                const float value = J->tab_b[q * J->nb + cur->base_b];
                for (int k = 0; k < E; k++) tb[q][k] = value;
            }
        }
        cur->off += E;
        return;
    }
    for (int q = q0; q < NQ; q++)
        for (int k = 0; k < E; k++) ta[q][k] = tb[q][k] = 1.0f; /* lanes ≥ cnt: finite fillers */
    for (int k0 = 0; k0 < cnt;) {
        if (cur->off == J->L) cursor_next_line(J, cur);
        const int len = (int)imin(cnt - k0, J->L - cur->off);
        for (int q = q0; q < NQ; q++) {
            const float *src = J->tab_a + q * J->na + cur->base_a + cur->off;
            for (int k = 0; k < len; k++) ta[q][k0 + k] = src[k];
            if (J->post > 1) {
                const float *srcb = J->tab_b + q * J->nb + cur->base_b + cur->off;
                for (int k = 0; k < len; k++) tb[q][k0 + k] = srcb[k];
            } else {
                const float value = J->tab_b[q * J->nb + cur->base_b];
                for (int k = 0; k < len; k++) tb[q][k0 + k] = value;
            }
        }
        cur->off += len;
        k0 += len;
    }
}

/* Fill the stage and the MLP inputs X[F][E] for elements [e0, e0 + cnt) (lanes ≥ cnt get zero
 * inputs). celo (0: small_fc, 1: Celo, 2: Celo2) is a compile-time constant in each instantiation
 * below, so channel indices are too. */
static inline __attribute__((always_inline)) void build_block_rule(const plan_t *pl, const job_t *J, int64_t e0,
                                                                   int cnt, cursor_t *cur, stage_t *restrict s,
                                                                   float (*restrict X)[E], const int celo) {
    const float *d = pl->c->decays + 7 * J->particle;
    const float mom0 = d[0], mom1 = d[1], mom2 = d[2];
    const float rd = d[3] < 0.0f ? 0.0f : (d[3] > 1.0f ? 1.0f : d[3]);
    float fd[3];
    for (int j = 0; j < 3; j++) fd[j] = d[4 + j] < 0.0f ? 0.0f : (d[4 + j] > 1.0f ? 1.0f : d[4 + j]);

    float pad_g[E], pad_p[E], pad_m[3 * E], pad_r[E], mo[3][E], ro[E];
    const float *restrict g = padded(J->g + e0, cnt, 1, pad_g);
    const float *restrict p = padded(J->p_in + e0, cnt, 1, pad_p);
    for (int k = 0; k < E; k++) { s->g[k] = clean_grad(g[k], celo); s->p[k] = p[k]; }
    if (pl->c->state_bf16) {
        uint16_t pad16[4 * E];
        const uint16_t *restrict m = (const uint16_t *)J->m_in + 3 * e0, *restrict r = (const uint16_t *)J->rms_in + e0;
        if (cnt < E) {
            memset(pad16, 0, sizeof(pad16));
            memcpy(pad16, m, sizeof(uint16_t) * 3 * (size_t)cnt);
            memcpy(pad16 + 3 * E, r, sizeof(uint16_t) * (size_t)cnt);
            m = pad16;
            r = pad16 + 3 * E;
        }
        for (int k = 0; k < E; k++) {
            mo[0][k] = from_bf16(m[3 * k]); mo[1][k] = from_bf16(m[3 * k + 1]); mo[2][k] = from_bf16(m[3 * k + 2]);
            ro[k] = from_bf16(r[k]);
        }
    } else {
        const float *restrict m = padded((const float *)J->m_in + 3 * e0, cnt, 3, pad_m);
        const float *restrict r = padded((const float *)J->rms_in + e0, cnt, 1, pad_r);
        for (int k = 0; k < E; k++) {
            mo[0][k] = m[3 * k]; mo[1][k] = m[3 * k + 1]; mo[2][k] = m[3 * k + 2];
            ro[k] = r[k];
        }
    }
    for (int k = 0; k < E; k++) {
        const float gk = s->g[k];
        s->m[0][k] = mom0 * mo[0][k] + (1.0f - mom0) * gk;
        s->m[1][k] = mom1 * mo[1][k] + (1.0f - mom1) * gk;
        s->m[2][k] = mom2 * mo[2][k] + (1.0f - mom2) * gk;
        s->r[k] = rd * ro[k] + (1.0f - rd) * (gk * gk);
    }

    /* The channels before fac_g: g, [Celo: clip(g, ±0.1)], p, m (3), rms, m·rsqrt(rms + ε) (3),
     * rsqrt(rms + ε) with ε = 1e-6 (1e-8 for Celo2); Celo puts g·rsqrt(rms + ε) after fac_g. c1
     * shifts Celo's channels. */
    const int c1 = celo ? 1 : 0, fg = 10 + c1, ada = celo ? 15 : 13, fm = ada, tb0 = ada + 3;
    const float rs_eps = celo == 2 ? 1e-8f : 1e-6f;
    for (int k = 0; k < E; k++) {
        const float gk = s->g[k], rs = rsqrt_exact(s->r[k] + rs_eps);
        X[0][k] = gk;
        X[1 + c1][k] = s->p[k];
        X[2 + c1][k] = s->m[0][k];
        X[3 + c1][k] = s->m[1][k];
        X[4 + c1][k] = s->m[2][k];
        X[5 + c1][k] = s->r[k];
        X[6 + c1][k] = s->m[0][k] * rs;
        X[7 + c1][k] = s->m[1][k] * rs;
        X[8 + c1][k] = s->m[2][k] * rs;
        X[9 + c1][k] = rs;
    }
    if (celo)
        for (int k = 0; k < E; k++) {
            const float gk = s->g[k];
            X[1][k] = gk > 0.1f ? 0.1f : (gk < -0.1f ? -0.1f : gk);
            X[14][k] = gk * X[10][k];
        }

    if (!J->factored) {
        float pad_v[3 * E];
        const float *restrict v = padded(J->vrow_in + 3 * e0, cnt, 3, pad_v);
        const float mom_eps = celo ? 0.0f : 1e-6f;
        for (int j = 0; j < 3; j++) {
            for (int k = 0; k < E; k++) {
                const float gk = s->g[k];
                const float vk = fd[j] * v[3 * k + j] + (1.0f - fd[j]) * (gk * gk + 1e-30f);
                const float vf9 = vk + 1e-9f, inv8 = rsqrt_exact(vk + 1e-8f);
                s->v[j][k] = vk;
                X[fg + j][k] = gk * rsqrt_exact(vf9 > 1e-9f ? vf9 : 1e-9f);
                X[fm + j][k] = s->m[j][k] * rsqrt_exact(vk + mom_eps);
                X[tb0 + j][k] = vk;
                X[tb0 + 3 + j][k] = vk;
                X[tb0 + 6 + j][k] = inv8;
                X[tb0 + 9 + j][k] = inv8;
            }
        }
        return;
    }

    gather_tables(J, cnt, cur, J->d0_is_a ? s->row : s->col, J->d0_is_a ? s->col : s->row, J->proj ? 6 : 0);
    for (int j = 0; j < 3; j++) {
        for (int k = 0; k < E; k++) {
            const float rf = s->row[6 + j][k], cf = s->col[6 + j][k];
            X[fg + j][k] = (s->g[k] * rf) * cf;
            X[fm + j][k] = (s->m[j][k] * rf) * cf;
        }
    }
    if (!J->proj)
        for (int j = 0; j < 3; j++) {
            for (int k = 0; k < E; k++) {
                X[tb0 + j][k] = s->row[j][k];
                X[tb0 + 3 + j][k] = s->col[j][k];
                X[tb0 + 6 + j][k] = s->row[3 + j][k];
                X[tb0 + 9 + j][k] = s->col[3 + j][k];
            }
        }
}

/* Not inlined into STATS and APPLY, so that both compute m, rms and v with one instruction sequence. */
__attribute__((noinline)) static void build_block_small_fc(const plan_t *pl, const job_t *J, int64_t e0, int cnt,
                                                           cursor_t *cur, stage_t *s, float (*X)[E]) {
    build_block_rule(pl, J, e0, cnt, cur, s, X, 0);
}

__attribute__((noinline)) static void build_block_celo(const plan_t *pl, const job_t *J, int64_t e0, int cnt,
                                                       cursor_t *cur, stage_t *s, float (*X)[E]) {
    build_block_rule(pl, J, e0, cnt, cur, s, X, 1);
}

__attribute__((noinline)) static void build_block_celo2(const plan_t *pl, const job_t *J, int64_t e0, int cnt,
                                                        cursor_t *cur, stage_t *s, float (*X)[E]) {
    build_block_rule(pl, J, e0, cnt, cur, s, X, 2);
}

static inline void build_block(const plan_t *pl, const job_t *J, int64_t e0, int cnt, cursor_t *cur, stage_t *s,
                               float (*X)[E]) {
    if (pl->c->rule == RULE_CELO) build_block_celo(pl, J, e0, cnt, cur, s, X);
    else if (pl->c->rule == RULE_CELO2) build_block_celo2(pl, J, e0, cnt, cur, s, X);
    else build_block_small_fc(pl, J, e0, cnt, cur, s, X);
}

/* ---------------------------------------------------------------------------------------------
 * The MLP on a block: Y[o][:] = act(bias_o + Σ_{k<K} W[o·ldw + k] X[k][:]), with OT outputs × NV
 * vectors of accumulators in registers (FMA-bound: OT + NV loads per OT·NV FMAs). bias_o is b[o],
 * plus the row Bv[o·ldb ...] of per-element biases (the projected broadcast channels) if Bv is
 * given: a block buffer, or the projection table itself when the block lies on one line.
 * ------------------------------------------------------------------------------------------- */

#define DEFINE_DENSE(OT) DEFINE_DENSE_(OT)
#define DEFINE_DENSE_(OT)                                                                           \
    static inline void dense_##OT(const float *restrict W, int ldw, const float *restrict b,       \
                                  const float *restrict Bv, int64_t ldb,                          \
                                  const float (*restrict X)[E], float (*restrict Y)[E], int O,     \
                                  int K, int relu) {                                              \
        for (int o0 = 0; o0 < O; o0 += OT) {                                                      \
            vf acc[OT][NV];                                                                       \
            _Pragma("GCC unroll 8") for (int o = 0; o < OT; o++)                                  \
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)                              \
                    acc[o][v] = Bv ? *(const vfu *)&Bv[(o0 + o) * ldb + v * VL] + SPLAT(b[o0 + o]) \
                                   : SPLAT(b[o0 + o]);                                            \
            for (int k = 0; k < K; k++) {                                                         \
                vf x[NV];                                                                         \
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) x[v] = *(const vf *)&X[k][v * VL]; \
                _Pragma("GCC unroll 8") for (int o = 0; o < OT; o++) {                            \
                    const vf w = SPLAT(W[(o0 + o) * ldw + k]);                                    \
                    _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[o][v] += w * x[v];   \
                }                                                                                 \
            }                                                                                     \
            _Pragma("GCC unroll 8") for (int o = 0; o < OT; o++)                                  \
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) {                            \
                    vf y = acc[o][v];                                                             \
                    /* ReLU that keeps NaN, as torch's relu does. */                              \
                    if (relu) y = (vf)((__typeof__(y < y))y & ~(y < SPLAT(0.0f)));                 \
                    *(vf *)&Y[o0 + o][v * VL] = y;                                                \
                }                                                                                 \
        }                                                                                         \
    }
DEFINE_DENSE(OT_WIDE)
DEFINE_DENSE(2)
#if OT_WIDE != 4
DEFINE_DENSE(4)
#endif
#define DENSE_(OT) dense_##OT
#define DENSE(OT) DENSE_(OT)

/* ---------------------------------------------------------------------------------------------
 * STATS, FIN and APPLY.
 * ------------------------------------------------------------------------------------------- */

static void unit_range(const job_t *J, int64_t lu, int64_t *e0, int64_t *e1) {
    *e0 = lu * CHUNK;
    *e1 = imin(J->n, *e0 + CHUNK);
}

static inline __attribute__((always_inline)) void stats_unit_rule(const plan_t *pl, job_t *J, int64_t lu,
                                                                   const int F) {
    int64_t e0, e1;
    unit_range(J, lu, &e0, &e1);
    /* Factored tensors: the broadcast channels' mean squares come from TABLE (J->tmean). */
    const int rows = J->factored ? F - 12 : F;
    stage_t s;
    float X[MAX_F][E] __attribute__((aligned(64)));
    float acc[MAX_F][E] __attribute__((aligned(64)));
    memset(acc, 0, sizeof(acc));
    cursor_t cur;
    if (J->factored) cursor_init(J, &cur, e0);
    for (int64_t e = e0; e < e1; e += E) {
        const int cnt = (int)imin(E, e1 - e);
        build_block(pl, J, e, cnt, &cur, &s, X);
        if (cnt < E)
            for (int f = 0; f < F; f++)
                for (int k = cnt; k < E; k++) X[f][k] = 0.0f;
        for (int f = 0; f < rows; f++)
            for (int k = 0; k < E; k++) acc[f][k] += X[f][k] * X[f][k];
    }
    double *out = J->sums + lu * F;
    for (int f = 0; f < F; f++) {
        double t = 0.0;
        for (int k = 0; k < E; k++) t += acc[f][k];
        out[f] = t;
    }
}

/* A grouped job's STATS unit: the slices (x, z0 .. z1-1) of the [gx][gy][gz] view, over all their
 * rows y in order, every input's square summed per slice in double (each slice belongs to one unit).
 * When the unit holds every z (gz ≤ ZSTRIPE) its elements are one contiguous range, walked in full
 * blocks; either way each slice's terms are added in increasing element order. */
static void stats_unit_grouped(const plan_t *pl, job_t *J, int64_t lu) {
    const int F = pl->F, rows = J->proj ? pl->NE : F; /* projected: the broadcast rows come from TABLE */
    const int64_t nzs = cdiv(J->gz, ZSTRIPE), x = lu / nzs, z0 = (lu % nzs) * ZSTRIPE;
    const int64_t z1 = imin(J->gz, z0 + ZSTRIPE);
    double *out = J->sums + x * J->gz * F;
    for (int64_t q = z0 * F; q < z1 * F; q++) out[q] = 0.0;
    stage_t s;
    float X[MAX_F][E] __attribute__((aligned(64)));
    cursor_t cur;
    if (z0 == 0 && z1 == J->gz) {
        const int64_t e0 = x * J->gy * J->gz, e1 = e0 + J->gy * J->gz;
        if (J->factored) cursor_init(J, &cur, e0);
        for (int64_t e = e0; e < e1; e += E) {
            const int cnt = (int)imin(E, e1 - e);
            build_block(pl, J, e, cnt, &cur, &s, X);
            for (int k = 0; k < cnt; k++) {
                double *o = out + ((e + k) % J->gz) * F;
                for (int f = 0; f < rows; f++) o[f] += (double)X[f][k] * (double)X[f][k];
            }
        }
        return;
    }
    for (int64_t y = 0; y < J->gy; y++) {
        const int64_t base = (x * J->gy + y) * J->gz;
        for (int64_t z = z0; z < z1; z += E) {
            const int cnt = (int)imin(E, z1 - z);
            if (J->factored) cursor_init(J, &cur, base + z);
            build_block(pl, J, base + z, cnt, &cur, &s, X);
            for (int k = 0; k < cnt; k++) {
                double *o = out + (z + k) * F;
                for (int f = 0; f < rows; f++) o[f] += (double)X[f][k] * (double)X[f][k];
            }
        }
    }
}

static void stats_unit(const plan_t *pl, job_t *J, int64_t lu) {
    if (J->grouped) stats_unit_grouped(pl, J, lu);
    else if (pl->c->rule != RULE_SMALL_FC) stats_unit_rule(pl, J, lu, 30);
    else stats_unit_rule(pl, J, lu, 28);
}

/* pa[o][e] = Σ over the 6 broadcast channels of statistic table t (v and rsqrt(v + 1e-8), 3 decays)
 * of w0n[o][row]·value, for entries [e0, e1); rows r_v and r_rs are the X rows of the table's v and
 * rsqrt channels. With e1 = e0 + 1 and ld = 1 it gives one line's bias vector. */
static void project(const plan_t *pl, const job_t *J, const float *t, int64_t nt, int r_v, int r_rs, int64_t e0,
                    int64_t e1, float *out, int64_t ld) {
    const int F = pl->F;
    for (int o = 0; o < pl->H; o++) {
        const float *w = J->w0n + o * F;
        for (int64_t e = e0; e < e1; e++) {
            float acc = 0.0f;
            if (J->grouped) {
                /* The first layer is not normalised: each entry takes its slice's factors. */
                const float *gi = J->ginv + entry_slice(J, e, t == J->tab_a) * F;
                for (int j = 0; j < 3; j++)
                    acc += (w[r_v + j] * gi[r_v + j]) * t[j * nt + e] + (w[r_rs + j] * gi[r_rs + j]) * t[(3 + j) * nt + e];
            } else {
                for (int j = 0; j < 3; j++) acc += w[r_v + j] * t[j * nt + e] + w[r_rs + j] * t[(3 + j) * nt + e];
            }
            out[o * ld + (e - e0)] = acc;
        }
    }
}

/* FIN from the mean squares of the F inputs (X row order; grouped jobs use their per-slice sums). */
static void finalize_from_means(const plan_t *pl, job_t *J, const double *mean) {
    const int F = pl->F, H = pl->H, ada = pl->NE - 3, tb0 = pl->NE;
    /* The second-moment normaliser's eps: 1e-5 (small_fc, Celo) or 1e-9 (Celo2). */
    const float eps = pl->c->rule == RULE_CELO2 ? 1e-9f : 1e-5f;
    float inv[MAX_F];
    if (J->grouped) {
        /* Per slice: the factors multiply the inputs in APPLY; the first layer stays as it is. */
        for (int64_t q = 0; q < J->gx * J->gz; q++)
            for (int f = 0; f < F; f++) {
                const double m = J->proj && f >= tb0 ? J->gtmean[q * 12 + f - tb0] : J->sums[q * F + f] / (double)J->gy;
                J->ginv[q * F + f] = rsqrt_exact(eps + (float)m);
            }
        for (int f = 0; f < F; f++) inv[f] = 1.0f;
    } else {
        for (int f = 0; f < F; f++) inv[f] = rsqrt_exact(eps + (float)mean[f]);
    }
    const float *w0 = pl->c->w0 + (int64_t)J->particle * H * F;
    for (int o = 0; o < H; o++)
        for (int f = 0; f < F; f++) J->w0n[o * F + f] = w0[o * F + spec_channel(f, ada)] * inv[f];
    /* Celo: the tensor's RMS sqrt(mean(p²) + 1e-9); channel 2 is p. */
    J->pscale = pl->c->rule == RULE_CELO ? sqrtf((float)mean[2] + 1e-9f) : 1.0f;
    if (J->proj) {
        /* Table a is v_row (X rows tb0.., tb0+6..) if d0 is axis a, else v_col (tb0+3.., tb0+9..). */
        const int ra = J->d0_is_a ? 0 : 3, rb = J->d0_is_a ? 3 : 0;
        project(pl, J, J->tab_a, J->na, tb0 + ra, tb0 + 6 + ra, 0, J->na, J->pa, J->na);
        if (J->post > 1) project(pl, J, J->tab_b, J->nb, tb0 + rb, tb0 + 6 + rb, 0, J->nb, J->pb, J->nb);
    }
}

static void finalize_job(const plan_t *pl, job_t *J) {
    const int F = pl->F, tb0 = pl->NE;
    double mean[MAX_F] = {0}; /* stays 0 for grouped jobs (Celo2: no pscale) */
    if (!J->grouped) {
        for (int64_t u = 0; u < J->n_units; u++)
            for (int f = 0; f < F; f++) mean[f] += J->sums[u * F + f];
        for (int f = 0; f < F; f++) mean[f] /= (double)J->n;
        if (J->factored)
            for (int q = 0; q < 12; q++) mean[tb0 + q] = J->tmean[q];
    }
    finalize_from_means(pl, J, mean);
}

/* Write p, m, rms (and v of vectors) of the block's first cnt elements; inlined with cnt = E in the
 * common case so that the interleaving stores vectorise. */
static inline __attribute__((always_inline)) void store_block(const lopt_call *c, const job_t *J, int64_t e,
                                                              int cnt, const stage_t *restrict s,
                                                              const float *restrict pn) {
    float *restrict p_out = J->p_out + e;
    for (int k = 0; k < cnt; k++) p_out[k] = pn[k];
    if (c->state_bf16) {
        uint16_t *restrict m = (uint16_t *)J->m_out + 3 * e, *restrict r = (uint16_t *)J->rms_out + e;
        for (int k = 0; k < cnt; k++) {
            const uint32_t idx = (uint32_t)(4 * (e + k));
            m[3 * k] = to_bf16(s->m[0][k], J->key, idx);
            m[3 * k + 1] = to_bf16(s->m[1][k], J->key, idx + 1);
            m[3 * k + 2] = to_bf16(s->m[2][k], J->key, idx + 2);
            r[k] = to_bf16(s->r[k], J->key, idx + 3);
        }
    } else {
        float *restrict m = (float *)J->m_out + 3 * e, *restrict r = (float *)J->rms_out + e;
        for (int k = 0; k < cnt; k++) {
            m[3 * k] = s->m[0][k]; m[3 * k + 1] = s->m[1][k]; m[3 * k + 2] = s->m[2][k];
            r[k] = s->r[k];
        }
    }
    if (!J->factored) {
        float *restrict v = J->vrow_out + 3 * e;
        for (int k = 0; k < cnt; k++) { v[3 * k] = s->v[0][k]; v[3 * k + 1] = s->v[1][k]; v[3 * k + 2] = s->v[2][k]; }
    }
}

/* The line's bias vector lb (the projection of table b's entry, post == 1), kept while it stays. */
static inline void line_bias(const plan_t *pl, const job_t *J, const cursor_t *cur, float *lb, int64_t *lb_entry) {
    if (*lb_entry == cur->base_b) return;
    const int rb = J->d0_is_a ? 3 : 0, tb0 = pl->NE;
    project(pl, J, J->tab_b, J->nb, tb0 + rb, tb0 + 6 + rb, cur->base_b, cur->base_b + 1, lb, 1);
    *lb_entry = cur->base_b;
}

/* The per-element projected bias of a block that spans lines (or a partial block): pa + (pb or the
 * line's lb) per segment, as gather_tables walks them. */
static void projected_bias(const plan_t *pl, const job_t *J, cursor_t *cur, int cnt, float (*restrict Bv)[E],
                           float *lb, int64_t *lb_entry) {
    const int H = pl->H;
    for (int o = 0; o < H; o++)
        for (int k = cnt; k < E; k++) Bv[o][k] = 0.0f;
    for (int k0 = 0; k0 < cnt;) {
        if (cur->off == J->L) cursor_next_line(J, cur);
        const int len = (int)imin(cnt - k0, J->L - cur->off);
        const float *pa = J->pa + cur->base_a + cur->off;
        if (J->post > 1) {
            const float *pb = J->pb + cur->base_b + cur->off;
            for (int o = 0; o < H; o++)
                for (int k = 0; k < len; k++) Bv[o][k0 + k] = pa[o * J->na + k] + pb[o * J->nb + k];
        } else {
            line_bias(pl, J, cur, lb, lb_entry);
            for (int o = 0; o < H; o++)
                for (int k = 0; k < len; k++) Bv[o][k0 + k] = pa[o * J->na + k] + lb[o];
        }
        cur->off += len;
        k0 += len;
    }
}

static void apply_unit(const plan_t *pl, job_t *J, int64_t lu) {
    int64_t e0, e1;
    unit_range(J, lu, &e0, &e1);
    const lopt_call *c = pl->c;
    const int F = pl->F, H = pl->H, celo = c->rule == RULE_CELO, celo2 = c->rule == RULE_CELO2, pi = J->particle;
    const int O2 = celo || celo2 ? 3 : 2;
    const float *b0 = c->b0 + (int64_t)pi * H, *w1 = c->w1 + (int64_t)pi * H * H, *b1 = c->b1 + (int64_t)pi * H;
    const float *w2 = c->w2 + (int64_t)pi * O2 * H, *b2 = c->b2 + (int64_t)pi * O2;
    const float lr = c->lr[pi], exp_mult = c->exp_mult, ps = J->pscale, scale = J->scale, wd = J->wd;
    stage_t s;
    float X[MAX_F][E] __attribute__((aligned(64)));
    float H1[MAX_H][E] __attribute__((aligned(64)));
    float H2[MAX_H][E] __attribute__((aligned(64)));
    float Y[2][E] __attribute__((aligned(64)));
    float Bv[MAX_H][E] __attribute__((aligned(64)));
    float lb[MAX_H], b_line[MAX_H];
    int64_t lb_entry = -1, b_line_entry = -1;
    /* Projected factored tensors feed only the per-element rows to the first layer. */
    const int K0 = J->k0;
    cursor_t cur;
    if (J->factored) cursor_init(J, &cur, e0);
    for (int64_t e = e0; e < e1; e += E) {
        const int cnt = (int)imin(E, e1 - e);
        const float *bias = b0, *bv = NULL;
        int64_t ldb = 0;
        if (J->proj) {
            cursor_t at = cur;
            if (at.off == J->L) cursor_next_line(J, &at);
            if (J->post == 1 && cnt == E && J->L - at.off >= E) {
                /* One line: the bias is b0 + lb (per line) plus the projection table's own row. */
                line_bias(pl, J, &at, lb, &lb_entry);
                if (b_line_entry != at.base_b) {
                    for (int o = 0; o < H; o++) b_line[o] = b0[o] + lb[o];
                    b_line_entry = at.base_b;
                }
                bias = b_line;
                bv = J->pa + at.base_a + at.off;
                ldb = J->na;
            } else {
                projected_bias(pl, J, &at, cnt, Bv, lb, &lb_entry);
                bv = &Bv[0][0];
                ldb = E;
            }
        }
        build_block(pl, J, e, cnt, &cur, &s, X);
        if (J->grouped) {
            /* Each element's inputs times its slice's normalisation factors. */
            int64_t q[E];
            const int64_t plane = J->gy * J->gz;
            for (int k = 0; k < E; k++) q[k] = k < cnt ? ((e + k) / plane * J->gz + (e + k) % J->gz) * F : 0;
            for (int f = 0; f < K0; f++)
                for (int k = 0; k < E; k++) X[f][k] *= J->ginv[q[k] + f];
        }
        if (celo2) {
            DENSE(OT_WIDE)(J->w0n, F, bias, bv, ldb, (const float (*)[E])X, H1, 8, K0, 1);
            DENSE(OT_WIDE)(w1, 8, b1, NULL, 0, (const float (*)[E])H1, H2, 8, 8, 1);
            DENSE(2)(w2, 8, b2, NULL, 0, (const float (*)[E])H2, Y, 2, 8, 0);
        } else if (celo) {
            DENSE(4)(J->w0n, F, bias, bv, ldb, (const float (*)[E])X, H1, 4, K0, 1);
            DENSE(4)(w1, 4, b1, NULL, 0, (const float (*)[E])H1, H2, 4, 4, 1);
            DENSE(2)(w2, 4, b2, NULL, 0, (const float (*)[E])H2, Y, 2, 4, 0);
        } else {
            DENSE(OT_WIDE)(J->w0n, F, bias, bv, ldb, (const float (*)[E])X, H1, H, K0, 1);
            DENSE(OT_WIDE)(w1, H, b1, NULL, 0, (const float (*)[E])H1, H2, H, H, 1);
            DENSE(2)(w2, H, b2, NULL, 0, (const float (*)[E])H2, Y, 2, H, 0);
        }
        float pn[E];
        /* small_fc: step_mult·d·exp(λ2·μ)·s_p; Celo: η·1e-3·d·exp(1e-3·a)·rms(p)·s_p (ps = 1 for
         * small_fc, an exact no-op), in the pure step's order of operations; then the wrappers'
         * decoupled weight decay on the pre-update p (skipped at 0, as the wrappers skip it). */
        if (celo2) {
            /* Celo2: the direction d (exp(0·o₁) = 1); torch orthogonalises, normalises and steps. */
            for (int k = 0; k < E; k++) pn[k] = Y[0][k];
        } else {
            for (int k = 0; k < E; k++)
                pn[k] = s.p[k] - (((lr * Y[0][k]) * exp_poly(exp_mult * Y[1][k])) * ps) * scale;
        }
        if (wd != 0.0f && !celo2)
            for (int k = 0; k < E; k++) pn[k] = pn[k] - wd * s.p[k];
        if (cnt == E) store_block(c, J, e, E, &s, pn);
        else store_block(c, J, e, cnt, &s, pn);
    }
}

/* FINISH (Celo2): the output normalisation of a tensor taken as a whole and the step, in place on
 * the parameter (p_in) from the direction d in p_out; the pure step's order, u = d · rsqrt(1e-9 +
 * mean(d²)), then p − scale·u − wd·p with the decay on the pre-update p. The sum runs in one
 * thread in element order (the same numbers for every thread count); callers hand over tensors of
 * at most one work unit, so it costs no parallelism. */
static void celo2_finish(const job_t *J) {
    if ((J->scale == 0.0f && J->wd == 0.0f) || J->n == 0) return;
    const float *d = J->p_out;
    float *p = (float *)J->p_in; /* the step's own parameter, written in place */
    double sum = 0.0;
    for (int64_t k = 0; k < J->n; k++) sum += (double)d[k] * (double)d[k];
    const float mult = (float)((double)J->scale / sqrt(1e-9 + sum / (double)J->n)), wd = J->wd;
    for (int64_t k = 0; k < J->n; k++) p[k] = p[k] - (mult * d[k] + wd * p[k]);
}

/* ---------------------------------------------------------------------------------------------
 * The phases of a sharded step (docs/sharding.md): each rank holds a block of rows of axis 0 of
 * every tensor and calls lopt_step_phase with phases 1, 2, 3, summing the exported sums over the
 * ranks between them.
 *   1  RED; the tables that need no other rank (table b, and table a unless axis a is the split
 *      axis) into the workspace, the state untouched; round 1: for split_a, table a's sums of G
 *      over the rank's rows, and if d1 is axis a, the sums of the new v_row per batch index (r̄).
 *   2  table a from round 1, r̄, the factors, v_row / v_col written once; STATS; round 2: per job
 *      the sums over the rank's elements of the F squared inputs. A replicated table (split_a's
 *      table a) is the same on every rank, so each rank counts its entries only for its own
 *      elements (n / entries per entry) and the sum over the ranks is the whole tensor's.
 *   3  FIN from round 2 and the whole tensor's count, APPLY.
 * An empty local block (A = 0 rows) still updates its replicated table a.
 * ------------------------------------------------------------------------------------------- */

static void adafactor_decays(const plan_t *pl, const job_t *J, float fd[3]) {
    const float *d = pl->c->decays + 7 * J->particle;
    for (int j = 0; j < 3; j++) fd[j] = d[4 + j] < 0.0f ? 0.0f : (d[4 + j] > 1.0f ? 1.0f : d[4 + j]);
}

static void shard_tables_local(const plan_t *pl, job_t *J, double *out) {
    float fd[3];
    adafactor_decays(pl, J, fd);
    const int64_t mid = J->mid, B = J->B, post = J->post;
    const float *vin_a = J->d0_is_a ? J->vrow_in : J->vcol_in, *vin_b = J->d0_is_a ? J->vcol_in : J->vrow_in;
    for (int64_t e = 0; e < J->nb; e++) {
        const float mean = red_mean(&J->rb, e / post, e % post);
        for (int j = 0; j < 3; j++) J->tab_b[j * J->nb + e] = fd[j] * vin_b[3 * e + j] + (1.0f - fd[j]) * mean;
    }
    if (!J->split_a) {
        for (int64_t e = 0; e < J->na; e++) {
            const float mean = red_mean(&J->ra, e / (mid * B * post), e % (mid * B * post));
            for (int j = 0; j < 3; j++) J->tab_a[j * J->na + e] = fd[j] * vin_a[3 * e + j] + (1.0f - fd[j]) * mean;
        }
        return;
    }
    double *o = out + J->x1_off; /* pre == 1: the reduction ra is [1][nyc][na] */
    for (int64_t z = 0; z < J->na; z++) {
        double s = 0.0;
        for (int64_t ci = 0; ci < J->ra.nyc; ci++) s += J->ra.part[ci * J->na + z];
        o[z] = s;
    }
    if (!J->d0_is_a) { /* v_row is table b; r̄ averages it over axis a, the split axis */
        double *r = o + J->na;
        for (int64_t q = 0; q < 3 * J->nbatch; q++) r[q] = 0.0;
        for (int64_t e = 0; e < J->nb; e++) {
            const int64_t bi = batch_index(J, e);
            for (int j = 0; j < 3; j++) r[3 * bi + j] += J->tab_b[j * J->nb + e];
        }
    }
}

static void shard_tables_reduced(const plan_t *pl, job_t *J, const double *reduced) {
    const double *in = reduced + J->x1_off;
    if (J->split_a) {
        float fd[3];
        adafactor_decays(pl, J, fd);
        const float *vin_a = J->d0_is_a ? J->vrow_in : J->vcol_in;
        for (int64_t e = 0; e < J->na; e++) {
            const float mean = (float)(in[e] / J->a_total);
            for (int j = 0; j < 3; j++) J->tab_a[j * J->na + e] = fd[j] * vin_a[3 * e + j] + (1.0f - fd[j]) * mean;
        }
    }
    float *vout_a = J->d0_is_a ? J->vrow_out : J->vcol_out, *vout_b = J->d0_is_a ? J->vcol_out : J->vrow_out;
    for (int64_t e = 0; e < J->na; e++)
        for (int j = 0; j < 3; j++) vout_a[3 * e + j] = J->tab_a[j * J->na + e];
    for (int64_t e = 0; e < J->nb; e++)
        for (int j = 0; j < 3; j++) vout_b[3 * e + j] = J->tab_b[j * J->nb + e];
    float *trow = J->d0_is_a ? J->tab_a : J->tab_b, *tcol = J->d0_is_a ? J->tab_b : J->tab_a;
    const int64_t nrow = J->d0_is_a ? J->na : J->nb, ncol = J->d0_is_a ? J->nb : J->na;
    if (J->split_a && !J->d0_is_a) {
        for (int64_t q = 0; q < 3 * J->nbatch; q++) J->rbar[q] = (float)(in[J->na + q] / J->a_total);
    } else { /* r̄ over d1, an axis the rank holds whole */
        const double span = (double)(J->d0_is_a ? J->B : J->A);
        for (int64_t q = 0; q < 3 * J->nbatch; q++) J->rbar[q] = 0.0;
        for (int64_t e = 0; e < nrow; e++) {
            const int64_t bi = batch_index(J, e);
            for (int j = 0; j < 3; j++) J->rbar[3 * bi + j] += trow[j * nrow + e];
        }
        for (int64_t q = 0; q < 3 * J->nbatch; q++) J->rbar[q] = (float)(J->rbar[q] / span);
    }
    table_factors(J, trow, tcol, nrow, ncol);
}

/* Round 2: Σ over the rank's elements of each squared input; the broadcast channels' sums from the
 * tables, each entry counted once per element of the rank it is broadcast to. */
static void shard_export_sums(const plan_t *pl, const job_t *J, double *out) {
    const int F = pl->F, rows = J->factored ? F - 12 : F, tb0 = pl->NE;
    double *o = out + J->x2_off;
    for (int f = 0; f < F; f++) o[f] = 0.0;
    for (int64_t u = 0; u < J->n_units; u++)
        for (int f = 0; f < rows; f++) o[f] += J->sums[u * F + f];
    if (!J->factored || J->n == 0) return;
    const float *trow = J->d0_is_a ? J->tab_a : J->tab_b, *tcol = J->d0_is_a ? J->tab_b : J->tab_a;
    const int64_t nrow = J->d0_is_a ? J->na : J->nb, ncol = J->d0_is_a ? J->nb : J->na;
    const double per_row = (double)J->n / (double)nrow, per_col = (double)J->n / (double)ncol;
    for (int j = 0; j < 3; j++) {
        double sv_r = 0.0, sv_c = 0.0, sr_r = 0.0, sr_c = 0.0;
        for (int64_t e = 0; e < nrow; e++) {
            const double v = trow[j * nrow + e], r = trow[(3 + j) * nrow + e];
            sv_r += v * v; sr_r += r * r;
        }
        for (int64_t e = 0; e < ncol; e++) {
            const double v = tcol[j * ncol + e], r = tcol[(3 + j) * ncol + e];
            sv_c += v * v; sr_c += r * r;
        }
        o[tb0 + j] = sv_r * per_row;
        o[tb0 + 3 + j] = sv_c * per_col;
        o[tb0 + 6 + j] = sr_r * per_row;
        o[tb0 + 9 + j] = sr_c * per_col;
    }
}

static void shard_finalize(const plan_t *pl, job_t *J, const double *reduced) {
    if (J->n == 0) return; /* nothing to apply */
    double mean[MAX_F];
    for (int f = 0; f < pl->F; f++) mean[f] = reduced[J->x2_off + f] / J->n_total;
    finalize_from_means(pl, J, mean);
}

/* ---------------------------------------------------------------------------------------------
 * Planning and the entry points.
 * ------------------------------------------------------------------------------------------- */

#define ALIGN_UP(x) (((x) + 63) & ~(size_t)63)

/* Lay out the jobs and the workspace; with ws == NULL only the byte count is computed. */
static int plan_build(plan_t *pl, const lopt_call *c, char *ws) {
    pl->c = c;
    pl->F = c->rule != RULE_SMALL_FC ? 30 : 28;
    pl->H = c->rule == RULE_CELO ? 4 : (c->rule == RULE_CELO2 ? 8 : c->hidden);
    pl->NE = c->rule != RULE_SMALL_FC ? 18 : 16;
    const int F = pl->F, H = pl->H;
    /* Projection tables get max(2% of the parameter bytes, PROJ_MIN_BYTES), first come first served
     * in job order: a function of the shapes only, so the numbers never depend on the threads. */
    double param_bytes = 0.0;
    for (int t = 0; t < c->n_tensors; t++) param_bytes += 4.0 * (double)c->tensors[(int64_t)t * T_COUNT + T_N];
    param_bytes *= c->n_particles;
    double proj_left = param_bytes * 0.02 > PROJ_MIN_BYTES ? param_bytes * 0.02 : PROJ_MIN_BYTES;
    const int64_t nj = (int64_t)c->n_particles * c->n_tensors;
    pl->n_jobs = nj;
    size_t off = 0;
#define TAKE(ptr, type, count)                                                       \
    do {                                                                             \
        size_t bytes_ = ALIGN_UP(sizeof(type) * (size_t)(count));                    \
        (ptr) = ws ? (type *)(ws + off) : NULL;                                      \
        off += bytes_;                                                               \
    } while (0)
    TAKE(pl->jobs, job_t, nj);
    TAKE(pl->red_start, int64_t, nj + 1);
    TAKE(pl->elem_start, int64_t, nj + 1);
    TAKE(pl->stat_start, int64_t, nj + 1);
    job_t scratch;
    int64_t red_units = 0, elem_units = 0, stat_units = 0, x1 = 0, x2 = 0;
    int status = 0;
    const size_t esz = c->state_bf16 ? 2 : 4;
    for (int64_t j = 0; j < nj; j++) {
        job_t *J = ws ? &pl->jobs[j] : &scratch;
        memset(J, 0, sizeof(*J));
        const int pi = (int)(j / c->n_tensors), t = (int)(j % c->n_tensors);
        const int64_t *d = c->tensors + (int64_t)t * T_COUNT;
        J->particle = pi;
        J->n = d[T_N];
        J->factored = (int)d[T_FACTORED];
        J->pre = d[T_PRE]; J->A = d[T_A]; J->mid = d[T_MID]; J->B = d[T_B]; J->post = d[T_POST];
        J->d0_is_a = (int)d[T_D0_IS_A];
        J->scale = c->tscale[2 * t];
        J->wd = c->tscale[2 * t + 1];
        J->key = c->seed ? mix32(c->seed[pi] * 0x2c1b3c6dU + (uint32_t)d[T_INDEX]) : 0; /* no seeds: sizing */
        const int64_t n = J->n;
        /* Products rather than n / A: a sharded tensor's local block may have A = 0 rows. */
        J->na = J->factored ? J->pre * J->mid * J->B * J->post : 0;
        J->nb = J->factored ? J->pre * J->A * J->mid * J->post : 0;
        J->n_total = (double)d[T_N_TOTAL];
        J->a_total = (double)d[T_A_TOTAL];
        J->split_a = J->factored && d[T_SPLIT_A];
        J->nbatch = J->pre * J->mid * J->post;
        J->L = J->factored ? (J->post > 1 ? J->post : J->B) : n;
        const int64_t nrow = J->d0_is_a ? J->na : J->nb, ncol = J->d0_is_a ? J->nb : J->na;
        J->p_in = (const float *)(intptr_t)d[T_P_IN] + pi * n;
        J->p_out = (float *)(intptr_t)d[T_P_OUT] + pi * n;
        J->g = (const float *)(intptr_t)d[T_G] + pi * n;
        J->m_in = (const char *)(intptr_t)d[T_M_IN] + (size_t)pi * 3 * n * esz;
        J->m_out = (char *)(intptr_t)d[T_M_OUT] + (size_t)pi * 3 * n * esz;
        J->rms_in = (const char *)(intptr_t)d[T_RMS_IN] + (size_t)pi * n * esz;
        J->rms_out = (char *)(intptr_t)d[T_RMS_OUT] + (size_t)pi * n * esz;
        const int64_t vrow_n = J->factored ? nrow : n;
        J->vrow_in = (const float *)(intptr_t)d[T_VROW_IN] + pi * 3 * vrow_n;
        J->vrow_out = (float *)(intptr_t)d[T_VROW_OUT] + pi * 3 * vrow_n;
        J->vcol_in = J->factored ? (const float *)(intptr_t)d[T_VCOL_IN] + pi * 3 * ncol : NULL;
        J->vcol_out = J->factored ? (float *)(intptr_t)d[T_VCOL_OUT] + pi * 3 * ncol : NULL;
        J->n_units = cdiv(n, CHUNK);
        J->gx = d[T_GX]; J->gy = d[T_GY]; J->gz = d[T_GZ];
        /* gy = 0 only for the empty local block of a sharded tensor. */
        if (J->gx < 1 || J->gy < (n > 0) || J->gz < 1 || J->gx * J->gy * J->gz != n) {
            status = -2; /* an inconsistent descriptor: treat the job as one slice and refuse the call */
            J->gx = J->gz = 1; J->gy = n;
        }
        J->grouped = c->rule == RULE_CELO2 && J->gx * J->gz > 1;
        J->n_sunits = J->grouped ? J->gx * cdiv(J->gz, ZSTRIPE) : J->n_units;
        if (J->factored) {
            red_plan(&J->ra, J->pre, J->A, J->mid * J->B * J->post);
            red_plan(&J->rb, J->pre * J->A * J->mid, J->B, J->post);
            TAKE(J->ra.part, float, J->ra.X * J->ra.nyc * J->ra.Z);
            TAKE(J->rb.part, float, J->rb.X * J->rb.nyc * J->rb.Z);
            TAKE(J->tab_a, float, NQ * J->na);
            TAKE(J->tab_b, float, NQ * J->nb);
            TAKE(J->rbar, double, 3 * J->nbatch);
            const double proj_bytes = 4.0 * H * (double)(J->na + (J->post > 1 ? J->nb : 0));
            /* A grouped job can project when its factored axes are its matrix axes (each table
             * entry then lies in one slice): the usual conv kernel. */
            const int aligned = J->mid == 1 && J->gx == J->pre && J->gz == J->post;
            J->proj = (!J->grouped || aligned) && proj_bytes <= proj_left;
            if (J->proj) {
                proj_left -= proj_bytes;
                TAKE(J->pa, float, H * J->na);
                if (J->post > 1) TAKE(J->pb, float, H * J->nb);
            }
        }
        TAKE(J->sums, double, (J->grouped ? J->gx * J->gz : J->n_units) * F);
        if (J->grouped) TAKE(J->ginv, float, J->gx * J->gz * F);
        if (J->grouped && J->proj) TAKE(J->gtmean, double, J->gx * J->gz * 12);
        TAKE(J->w0n, float, H * F);
        /* Celo2 vectors read the first 15 inputs only (spec groups 0–8). */
        J->k0 = J->proj ? pl->NE : (c->rule == RULE_CELO2 && !J->factored ? pl->NE - 3 : F);
        if (ws) {
            pl->red_start[j] = red_units;
            pl->elem_start[j] = elem_units;
            pl->stat_start[j] = stat_units;
        }
        red_units += J->factored ? J->ra.n_units + J->rb.n_units : 0;
        elem_units += J->n_units;
        stat_units += J->n_sunits;
        J->x1_off = x1;
        J->x2_off = x2;
        x1 += J->split_a ? J->na + (J->d0_is_a ? 0 : 3 * J->nbatch) : 0;
        x2 += F;
    }
    pl->n_x1 = x1;
    pl->n_x2 = x2;
    if (ws) {
        pl->red_start[nj] = red_units;
        pl->elem_start[nj] = elem_units;
        pl->stat_start[nj] = stat_units;
    }
    pl->n_red_units = red_units;
    pl->n_elem_units = elem_units;
    pl->n_stat_units = stat_units;
    pl->ws_bytes = off;
#undef TAKE
    return status;
}

/* The job whose units [start[j], start[j+1]) contain u. */
static int64_t job_of(const int64_t *start, int64_t nj, int64_t u) {
    int64_t lo = 0, hi = nj - 1;
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (start[mid] <= u) lo = mid; else hi = mid - 1;
    }
    return lo;
}

/* Bytes of workspace one call with these descriptors allocates (pointers are not read). */
int64_t lopt_workspace_bytes(const lopt_call *c) {
    plan_t pl;
    plan_build(&pl, c, NULL);
    return (int64_t)pl.ws_bytes;
}

/* The vector width this library was compiled for (16: AVX-512, 8: AVX2 + FMA, 4: other). */
int32_t lopt_vector_width(void) { return VL; }

/* Run the RED units. */
#define RUN_RED(pl, clip)                                                                           \
    _Pragma("omp for schedule(dynamic, 1)") for (int64_t u = 0; u < (pl).n_red_units; u++) {       \
        job_t *J = &(pl).jobs[job_of((pl).red_start, (pl).n_jobs, u)];                              \
        const int64_t lu = u - (pl).red_start[J - (pl).jobs];                                       \
        if (lu < J->ra.n_units) red_unit(&J->ra, lu, J->g, clip);                                   \
        else red_unit(&J->rb, lu - J->ra.n_units, J->g, clip);                                      \
    }

/* One step in phases (0: the whole step). ws: lopt_workspace_bytes of memory, 64-byte aligned, kept
 * by the caller between the phases of one step (the tables, r̄ and the sums persist in it). Phase 1
 * writes lopt_exchange_length(c, 1) sums to out; the caller sums them over the ranks and hands them
 * to phase 2 as reduced; phase 2 writes lopt_exchange_length(c, 2) sums to out, reduced likewise for
 * phase 3 (LO / Celo rules only). Returns 0, -2 for an invalid call (as lopt_step), -3 for an
 * unknown phase. */
int32_t lopt_step_phase(const lopt_call *c, int32_t phase, char *ws, const double *reduced, double *out) {
    if (c->n_particles <= 0 || c->n_tensors <= 0) return 0;
    if (c->rule != RULE_SMALL_FC && c->rule != RULE_CELO && c->rule != RULE_CELO2) return -2;
    if (c->rule == RULE_SMALL_FC && (c->hidden <= 0 || c->hidden > MAX_H || c->hidden % OT_WIDE)) return -2;
    if (phase < 0 || phase > 3 || (phase > 0 && c->rule == RULE_CELO2)) return -3;
    plan_t pl;
    if (plan_build(&pl, c, ws) != 0) return -2;
    const int clip = c->rule != RULE_SMALL_FC; /* Celo and Celo2 clip g to ±1000 */
    const int64_t nj = pl.n_jobs;
#pragma omp parallel num_threads(c->n_threads > 0 ? c->n_threads : 1)
    {
        if (phase == 0) {
            RUN_RED(pl, clip)
#pragma omp for schedule(dynamic, 1)
            for (int64_t j = 0; j < nj; j++)
                if (pl.jobs[j].factored) table_job(&pl, &pl.jobs[j]);
        }
        if (phase == 1) {
            RUN_RED(pl, clip)
#pragma omp for schedule(dynamic, 1)
            for (int64_t j = 0; j < nj; j++)
                if (pl.jobs[j].factored) shard_tables_local(&pl, &pl.jobs[j], out);
        }
        if (phase == 2) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t j = 0; j < nj; j++)
                if (pl.jobs[j].factored) shard_tables_reduced(&pl, &pl.jobs[j], reduced);
        }
        if (phase == 0 || phase == 2) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t u = 0; u < pl.n_stat_units; u++) {
                job_t *J = &pl.jobs[job_of(pl.stat_start, nj, u)];
                stats_unit(&pl, J, u - pl.stat_start[J - pl.jobs]);
            }
        }
        if (phase == 2) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t j = 0; j < nj; j++) shard_export_sums(&pl, &pl.jobs[j], out);
        }
        if (phase == 0) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t j = 0; j < nj; j++) finalize_job(&pl, &pl.jobs[j]);
        }
        if (phase == 3) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t j = 0; j < nj; j++) shard_finalize(&pl, &pl.jobs[j], reduced);
        }
        if (phase == 0 || phase == 3) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t u = 0; u < pl.n_elem_units; u++) {
                job_t *J = &pl.jobs[job_of(pl.elem_start, nj, u)];
                apply_unit(&pl, J, u - pl.elem_start[J - pl.jobs]);
            }
        }
        if (phase == 0 && c->rule == RULE_CELO2) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t j = 0; j < nj; j++) celo2_finish(&pl.jobs[j]);
        }
    }
    return 0;
}

/* Length of the sums a sharded step exchanges after phase 1 (round 1) or phase 2 (round 2). */
int64_t lopt_exchange_length(const lopt_call *c, int32_t round) {
    plan_t pl;
    plan_build(&pl, c, NULL);
    return round == 1 ? pl.n_x1 : pl.n_x2;
}

/* One fused step. Returns 0, -1 if the workspace could not be allocated, or -2 for an invalid call
 * (unknown rule, unsupported hidden size, inconsistent normalisation view), before writing anything. */
int32_t lopt_step(const lopt_call *c) {
    if (c->n_particles <= 0 || c->n_tensors <= 0) return 0;
    if (c->rule != RULE_SMALL_FC && c->rule != RULE_CELO && c->rule != RULE_CELO2) return -2;
    if (c->rule == RULE_SMALL_FC && (c->hidden <= 0 || c->hidden > MAX_H || c->hidden % OT_WIDE)) return -2;
    plan_t pl;
    if (plan_build(&pl, c, NULL) != 0) return -2;
    char *ws = (char *)aligned_alloc(64, ALIGN_UP(pl.ws_bytes));
    if (!ws) return -1;
    const int32_t status = lopt_step_phase(c, 0, ws, NULL, NULL);
    free(ws);
    return status;
}
