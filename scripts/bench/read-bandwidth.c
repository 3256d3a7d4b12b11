/* Streaming-read memory bandwidth (STREAM-like "sum" kernel over 1 GiB, best of 10 passes),
 * the denominator for "decode as % of memory bandwidth" in BENCHMARKS.md.
 *   cc -O3 -march=native -fopenmp scripts/bench/read-bandwidth.c -o /tmp/read-bw && /tmp/read-bw
 * `/tmp/read-bw huge` backs the buffer with 2 MiB transparent huge pages (madvise), as camelid's
 * repacked weights are; without it the buffer has the 4 KiB pages a file mapping has.
 */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <immintrin.h>
#include <string.h>
#include <sys/mman.h>

int main(int argc, char **argv) {
    size_t n = (1ull << 30) / sizeof(__m256i);
    int huge = argc > 1 && strcmp(argv[1], "huge") == 0;
    __m256i *a = aligned_alloc(huge ? (2u << 20) : 64, n * sizeof(__m256i));
    if (huge) madvise(a, n * sizeof(__m256i), MADV_HUGEPAGE);
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) a[i] = _mm256_set1_epi64x((long long)i);
    double best = 1e30;
    long long sink = 0;
    for (int rep = 0; rep < 10; rep++) {
        double t = omp_get_wtime();
        __m256i total = _mm256_setzero_si256();
        #pragma omp parallel
        {
            __m256i s0 = _mm256_setzero_si256(), s1 = s0;
            #pragma omp for
            for (size_t i = 0; i < n; i += 2) {
                s0 = _mm256_add_epi64(s0, _mm256_load_si256(a + i));
                s1 = _mm256_add_epi64(s1, _mm256_load_si256(a + i + 1));
            }
            #pragma omp critical
            total = _mm256_add_epi64(total, _mm256_add_epi64(s0, s1));
        }
        t = omp_get_wtime() - t;
        if (t < best) best = t;
        sink += _mm256_extract_epi64(total, 0);
    }
    printf("threads %d%s: %.2f GB/s (best of 10 reads of 1 GiB)  [%lld]\n", omp_get_max_threads(),
           huge ? ", 2 MiB pages" : "", (double)(1ull << 30) / best / 1e9, sink & 1);
    return 0;
}
