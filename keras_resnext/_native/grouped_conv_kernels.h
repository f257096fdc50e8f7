// Microkernels for NHWC 3x3 grouped convolutions with 4 or 8 channels per
// group, for CPUs with AVX2 and FMA. oneDNN runs these shapes (ResNeXt's
// first two stages) at 7-18 GMAC/s on a 2-core Zen 3; these keep a tile of
// outputs in registers and reach 33-43 GMAC/s per core on cached data
// (benchmarks/grouped_conv.py has the in-model comparison). From 16 channels
// per group on, oneDNN's kernels are as fast or faster, so they stay in use.
//
// Each output row is split into tiles of T pixels. For every tile and group,
// the 3 x IC input window (zero where it falls into the padding) is copied into
// a small contiguous buffer, so the kernels address it with constant offsets.
// An optional per-channel affine map (inference batch norm) and ReLU are
// applied before the store.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace {

struct Conv {
  int n, h, w, c;  // input, NHWC, unpadded
  int cout, cg, groups;
  int stride, pad_top, pad_left;
  int ho, wo;
  const float* scale;   // nullptr: no affine map
  const float* offset;
  bool relu;
};

template <int IC, int CW>
inline void pack_window(const Conv& s, const float* x, int n, int ih0, int iw0,
                        int ch0, float* buf) {
  for (int kh = 0; kh < 3; ++kh) {
    const int ih = ih0 + kh;
    float* dst = buf + kh * IC * CW;
    if (ih < 0 || ih >= s.h) {
      for (int i = 0; i < IC * CW; i += 8) _mm256_store_ps(dst + i, _mm256_setzero_ps());
      continue;
    }
    const float* row = x + (static_cast<int64_t>(n) * s.h + ih) * s.w * s.c + ch0;
    for (int ic = 0; ic < IC; ++ic) {
      const int iw = iw0 + ic;
      float* d = dst + ic * CW;
      if (iw < 0 || iw >= s.w) {
#pragma GCC unroll 8
        for (int i = 0; i < CW; i += 8) _mm256_store_ps(d + i, _mm256_setzero_ps());
      } else {
        const float* src = row + static_cast<int64_t>(iw) * s.c;
#pragma GCC unroll 8
        for (int i = 0; i < CW; i += 8) _mm256_store_ps(d + i, _mm256_loadu_ps(src + i));
      }
    }
  }
}

// 4 input and 4 output channels per group: one vector of 8 output channels
// covers 2 groups, and each input channel reaches its group's outputs through
// an in-lane broadcast. wp: this block's weights as [kh][kw][j][8].
template <int S, int T>
__attribute__((noinline)) void tile_cg4(const float* __restrict xb,
                                        const float* __restrict wp,
                                        float* __restrict out) {
  constexpr int IC = (T - 1) * S + 3;
  __m256 acc[T];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
#pragma GCC unroll 1
  for (int kh = 0; kh < 3; ++kh) {
#pragma GCC unroll 3
    for (int kw = 0; kw < 3; ++kw) {
      const float* w = wp + (kh * 3 + kw) * 32;
      const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8),
                   w2 = _mm256_loadu_ps(w + 16), w3 = _mm256_loadu_ps(w + 24);
      const float* xk = xb + (kh * IC + kw) * 8;
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        const __m256 xv = _mm256_load_ps(xk + t * S * 8);
        acc[t] = _mm256_fmadd_ps(_mm256_permute_ps(xv, 0x00), w0, acc[t]);
        acc[t] = _mm256_fmadd_ps(_mm256_permute_ps(xv, 0x55), w1, acc[t]);
        acc[t] = _mm256_fmadd_ps(_mm256_permute_ps(xv, 0xAA), w2, acc[t]);
        acc[t] = _mm256_fmadd_ps(_mm256_permute_ps(xv, 0xFF), w3, acc[t]);
      }
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) _mm256_store_ps(out + t * 8, acc[t]);
}

// CG input and CG = 8V output channels per group: broadcast one input
// channel, multiply by V weight vectors. wp: the group's weights [kh][kw][j][8V].
// T * V accumulators stay within AVX2's 16 registers.
template <int S, int T, int CG, int V>
__attribute__((noinline)) void tile_bcast(const float* __restrict xb,
                                          const float* __restrict wp,
                                          float* __restrict out) {
  constexpr int IC = (T - 1) * S + 3;
  __m256 acc[T][V];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[t][v] = _mm256_setzero_ps();
#pragma GCC unroll 1
  for (int kh = 0; kh < 3; ++kh) {
#pragma GCC unroll 3
    for (int kw = 0; kw < 3; ++kw) {
      const float* xk = xb + (kh * IC + kw) * CG;
      const float* wk = wp + (kh * 3 + kw) * CG * V * 8;
#pragma GCC unroll 2
      for (int j = 0; j < CG; ++j) {
        __m256 wv[V];
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) wv[v] = _mm256_loadu_ps(wk + j * V * 8 + v * 8);
#pragma GCC unroll 16
        for (int t = 0; t < T; ++t) {
          const __m256 b = _mm256_broadcast_ss(xk + t * S * CG + j);
#pragma GCC unroll 8
          for (int v = 0; v < V; ++v) acc[t][v] = _mm256_fmadd_ps(b, wv[v], acc[t][v]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) _mm256_store_ps(out + (t * V + v) * 8, acc[t][v]);
}

inline void store(const Conv& s, float* y, const float* acc, int ch) {
  __m256 a = _mm256_load_ps(acc);
  if (s.scale != nullptr) {
    a = _mm256_fmadd_ps(a, _mm256_loadu_ps(s.scale + ch), _mm256_loadu_ps(s.offset + ch));
  }
  if (s.relu) a = _mm256_max_ps(a, _mm256_setzero_ps());
  _mm256_storeu_ps(y + ch, a);
}

// Packs TF-layout weights [3][3][cg][cout] into the order the tiles read.
void pack_weights(const Conv& s, const float* w, float* packed) {
  if (s.cg == 4) {  // [cout / 8][kh][kw][j][8]
    for (int cb = 0; cb < s.cout / 8; ++cb)
      for (int k = 0; k < 9; ++k)
        for (int j = 0; j < 4; ++j)
          for (int l = 0; l < 8; ++l)
            packed[((cb * 9 + k) * 4 + j) * 8 + l] = w[(k * 4 + j) * s.cout + cb * 8 + l];
  } else {  // [g][kh][kw][j][cg]
    for (int g = 0; g < s.groups; ++g)
      for (int k = 0; k < 9; ++k)
        for (int j = 0; j < s.cg; ++j)
          for (int o = 0; o < s.cg; ++o)
            packed[((static_cast<int64_t>(g) * 9 + k) * s.cg + j) * s.cg + o] =
                w[(static_cast<int64_t>(k) * s.cg + j) * s.cout + g * s.cg + o];
  }
}

template <int S>
void row_cg4(const Conv& s, const float* x, const float* packed, float* y, int n, int oh) {
  constexpr int T = 8, IC = (T - 1) * S + 3;
  alignas(32) float xb[3 * IC * 8];
  alignas(32) float acc[T * 8];
  float* yrow = y + (static_cast<int64_t>(n) * s.ho + oh) * s.wo * s.cout;
  for (int ow0 = 0; ow0 < s.wo; ow0 += T) {
    const int valid = std::min(T, s.wo - ow0);
    for (int cb = 0; cb < s.cout / 8; ++cb) {
      pack_window<IC, 8>(s, x, n, oh * S - s.pad_top, ow0 * S - s.pad_left, cb * 8, xb);
      tile_cg4<S, T>(xb, packed + cb * 9 * 32, acc);
      for (int t = 0; t < valid; ++t)
        store(s, yrow + static_cast<int64_t>(ow0 + t) * s.cout, acc + t * 8, cb * 8);
    }
  }
}

template <int S, int CG>
void row_bcast(const Conv& s, const float* x, const float* packed, float* y, int n, int oh) {
  constexpr int V = CG / 8;
  constexpr int T = 14 / V;
  constexpr int IC = (T - 1) * S + 3;
  alignas(32) float xb[3 * IC * CG];
  alignas(32) float acc[T * V * 8];
  float* yrow = y + (static_cast<int64_t>(n) * s.ho + oh) * s.wo * s.cout;
  for (int g = 0; g < s.groups; ++g) {
    for (int ow0 = 0; ow0 < s.wo; ow0 += T) {
      const int valid = std::min(T, s.wo - ow0);
      pack_window<IC, CG>(s, x, n, oh * S - s.pad_top, ow0 * S - s.pad_left, g * CG, xb);
      tile_bcast<S, T, CG, V>(xb, packed + static_cast<int64_t>(g) * 9 * CG * CG, acc);
      for (int t = 0; t < valid; ++t)
        for (int v = 0; v < V; ++v)
          store(s, yrow + static_cast<int64_t>(ow0 + t) * s.cout, acc + (t * V + v) * 8,
                g * CG + v * 8);
    }
  }
}

using RowFn = void (*)(const Conv&, const float*, const float*, float*, int, int);

RowFn select_row(int cg, int stride) {
  const bool s1 = stride == 1;
  switch (cg) {
    case 4: return s1 ? row_cg4<1> : row_cg4<2>;
    case 8: return s1 ? row_bcast<1, 8> : row_bcast<2, 8>;
  }
  return nullptr;
}

}  // namespace

