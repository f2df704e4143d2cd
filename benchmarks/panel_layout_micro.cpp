// Decode GEMV of qvl's int4 kernel (VNNI build, MatMulNBits' layout) against a column-interleaved "panel" layout
// (8 columns per 32-byte vector, lanes = columns: no per-block reduction), on random codes, 2 threads splitting
// the columns of each 2048x6144 block-128 layer, a barrier per layer as ORT's ParallelFor has:
//     g++ -O3 -std=c++20 -mavx2 -mfma -pthread benchmarks/panel_layout_micro.cpp runtime/kernels/nbits_vnni.cpp \
//         -o /tmp/panel && /tmp/panel 0 1 && /tmp/panel 1 1 && /tmp/panel 0 16 && /tmp/panel 1 16
// args: layout (0 MatMulNBits', 1 panel), layers (1 = 7 MB, cache-resident; 16 = 107 MB, streamed). Prints GB/s of
// weights + scales. The panel kernel's sums run in another order than qvl's kernel: a timing probe, not an op.
#pragma GCC target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")
#define QVL_ISA vnni
#define QVL_VNNI 1
#include "../runtime/kernels/nbits_avx2.h"
#include <thread>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
using namespace qvl;
const int K = 2048, N = 6144, BLK = 128, NB = K / BLK; int L = 16;
// panel: per 8-column tile, per pair of 4-code groups: 32 bytes (8 columns x 4 bytes, low nibble = group g, high = g+1)
static void panel_tile(const uint8_t* P, const float* ST, const QuantRow& qa, float* y) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc = _mm256_setzero_ps();
  for (int b = 0; b < NB; ++b) {
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    const uint8_t* pb = P + (size_t)b * (BLK / 8) * 32;
    const int8_t* q = qa.q + b * BLK;
    _mm_prefetch((const char*)(pb + 2048), _MM_HINT_T0);
    _mm_prefetch((const char*)(pb + 2048 + 64), _MM_HINT_T0);
#pragma GCC unroll 16
    for (int p = 0; p < BLK / 8; ++p) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(pb + p * 32));
      int32_t a0, a1; memcpy(&a0, q + 8 * p, 4); memcpy(&a1, q + 8 * p + 4, 4);
      s0 = _mm256_dpbusd_epi32(s0, _mm256_and_si256(v, low), _mm256_set1_epi32(a0));
      s1 = _mm256_dpbusd_epi32(s1, _mm256_and_si256(_mm256_srli_epi16(v, 4), low), _mm256_set1_epi32(a1));
    }
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(s0, s1), _mm256_set1_epi32(qa.zp_term[b]));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(_mm256_set1_ps(qa.scale[b]), _mm256_loadu_ps(ST + b * 8)), acc);
  }
  _mm256_storeu_ps(y, acc);
}
int main(int argc, char** argv) {
  int mode = atoi(argv[1]); L = atoi(argv[2]); int reps = 960 / L;
  size_t bytes = (size_t)N * K / 2;
  std::vector<uint8_t*> B(L); std::vector<float*> S(L);
  for (int l = 0; l < L; ++l) { B[l] = (uint8_t*)aligned_alloc(64, bytes); S[l] = (float*)aligned_alloc(64, N * NB * 4);
    for (size_t i = 0; i < bytes; ++i) B[l][i] = rand(); for (int i = 0; i < N * NB; ++i) S[l][i] = 0.01f; }
  std::vector<int8_t> q(K); std::vector<float> sc(NB, 0.02f); std::vector<int32_t> zp(NB, -8 * 100);
  for (int i = 0; i < K; ++i) q[i] = rand() % 255 - 127;
  QuantRow qa{q.data(), sc.data(), zp.data()};
  std::vector<float> Y(N);
  std::barrier sync(2);
  auto worker = [&](int t) {
    for (int r = 0; r < reps; ++r) for (int l = 0; l < L; ++l) {
      const int n0 = t * N / 2, n1 = (t + 1) * N / 2;
      if (mode == 0) {
        Job j{&qa, 1, K, BLK, 4, N, 64, B[l], S[l], Y.data(), true};
        for (int n = n0; n < n1; n += 64) vnni::run_columns(j, n, n + 64);
      } else {
        for (int n = n0; n < n1; n += 8) panel_tile(B[l] + (size_t)n * K / 2, S[l] + (size_t)n * NB, qa, Y.data() + n);
      }
      sync.arrive_and_wait();
    }
  };
  auto t0 = std::chrono::steady_clock::now();
  std::thread a(worker, 0), b(worker, 1); a.join(); b.join();
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  printf("mode %d: %.1f GB/s (%.2f ms per 16 layers)\n", mode, reps * L * (bytes + N * NB * 4.0) / s / 1e9, s / reps * 1e3);
}
