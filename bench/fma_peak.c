/* One core's FMA peak, the denominator of a kernel's "% of peak" (docs/benchmarks.md): 12 independent
 * chains of 512-bit FMAs (AVX-512) or, built without AVX-512, 256-bit ones, enough to cover the FMA
 * latency of two pipes. Zen 4 runs one 512-bit FMA per cycle, Zen 5 two.
 *
 *     cc -O3 -march=native bench/fma_peak.c -o /tmp/peak && /tmp/peak
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#ifdef __AVX512F__
typedef __m512 vec;
#define LANES 16
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define SET(x) _mm512_set1_ps(x)
static float sum(vec v) { return _mm512_reduce_add_ps(v); }
#else
typedef __m256 vec;
#define LANES 8
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define SET(x) _mm256_set1_ps(x)
static float sum(vec v) {
    float f[8];
    _mm256_storeu_ps(f, v);
    return f[0] + f[1] + f[2] + f[3] + f[4] + f[5] + f[6] + f[7];
}
#endif

int main(void) {
    vec a[12];
    for (int i = 0; i < 12; i++) a[i] = SET(i * 0.001f);
    vec b = SET(0.999999f), c = SET(1e-7f);
    long n = 200000000;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long k = 0; k < n; k++)
        for (int i = 0; i < 12; i++) a[i] = FMA(a[i], b, c);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    float r = 0;
    for (int i = 0; i < 12; i++) r += sum(a[i]);
    printf("%d-lane FMAs: %.1f GFLOP/s on one core (checksum %.3f)\n", LANES, n * 12 * 2.0 * LANES / s / 1e9, r);
    return 0;
}
