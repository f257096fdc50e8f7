// Microkernels for NHWC 3x3 grouped convolutions with 4, 8, 16 or 32 channels
// per group, for CPUs with AVX2 and FMA.
//
// Each thread walks its range of output rows. The three input rows an output
// row needs are kept in a small ring, zero-padded and regrouped channel block
// by channel block ([block][padded width][block channels]), so one copy of each
// input row serves every output row that reads it, and the kernels address a
// block's window with compile-time offsets. For each block, the output row is
// cut into tiles of at most T pixels whose sums stay in registers; an optional
// per-channel affine map (inference batch norm) and ReLU are applied before the
// store.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace {

struct Conv {
  int n, h, w, c;  // input, NHWC, unpadded
  int cout, cg, groups;
  int stride, pad_top, pad_bottom, pad_left, pad_right;
  int ho, wo;
  const float* scale;  // nullptr: no affine map
  const float* offset;
  bool relu;
};

// Channels per block of the regrouped rows: one group, or two groups of 4.
inline int block_width(int cg) { return cg < 8 ? 8 : cg; }

// Pixels in a regrouped row: the input's width plus its left and right padding.
inline int64_t padded_width(const Conv& s) {
  return static_cast<int64_t>(s.w) + s.pad_left + s.pad_right;
}

// Output channels a tile computes in one pass over its window.
constexpr int pass_width(int cg) { return cg <= 8 ? 8 : 16; }

class RowRing {
 public:
  ~RowRing() { std::free(buffer_); }

  // Called at the start of each range of rows: the input tensor may differ.
  void prepare(const Conv& s) {
    const int64_t floats = padded_width(s) * s.c;
    if (floats * 3 > capacity_) {
      std::free(buffer_);
      capacity_ = floats * 3;
      buffer_ = static_cast<float*>(std::aligned_alloc(64, ((capacity_ * 4 + 63) / 64) * 64));
    }
    slot_floats_ = floats;
    tags_ = {-1, -1, -1};
  }

  // Row ih (padded coordinates: ih + pad_top) of image n, regrouped.
  const float* row(const Conv& s, const float* x, int n, int padded_ih) {
    const int slot = padded_ih % 3;
    const int64_t tag = static_cast<int64_t>(n) * (s.h + s.pad_top + s.pad_bottom) + padded_ih;
    float* dst = buffer_ + slot * slot_floats_;
    if (tags_[slot] == tag) return dst;
    tags_[slot] = tag;
    const int ih = padded_ih - s.pad_top;
    const int bw = block_width(s.cg);
    const int64_t width = padded_width(s);
    const int blocks = s.c / bw;
    if (ih < 0 || ih >= s.h) {
      std::memset(dst, 0, slot_floats_ * sizeof(float));
      return dst;
    }
    // Every copy rewrites its padding columns: a slot's previous contents
    // come from calls of any shape, whose interior columns may be padding now.
    for (int b = 0; b < blocks; ++b) {
      float* block = dst + b * width * bw;
      std::memset(block, 0, static_cast<size_t>(s.pad_left) * bw * sizeof(float));
      std::memset(block + static_cast<int64_t>(s.pad_left + s.w) * bw, 0,
                  static_cast<size_t>(s.pad_right) * bw * sizeof(float));
    }
    const float* src = x + (static_cast<int64_t>(n) * s.h + ih) * s.w * s.c;
    for (int iw = 0; iw < s.w; ++iw) {
      const float* p = src + static_cast<int64_t>(iw) * s.c;
      float* q = dst + static_cast<int64_t>(iw + s.pad_left) * bw;
      for (int b = 0; b < blocks; ++b) {
        for (int i = 0; i < bw; i += 8) {
          _mm256_store_ps(q + b * width * bw + i, _mm256_loadu_ps(p + b * bw + i));
        }
      }
    }
    return dst;
  }

 private:
  float* buffer_ = nullptr;
  int64_t capacity_ = 0;
  int64_t slot_floats_ = 0;
  std::array<int64_t, 3> tags_ = {-1, -1, -1};
};

struct Epilogue {
  const float* scale;
  const float* offset;
  bool relu;

  inline void store(float* y, __m256 a, int ch) const {
    if (scale != nullptr) {
      a = _mm256_fmadd_ps(a, _mm256_loadu_ps(scale + ch), _mm256_loadu_ps(offset + ch));
    }
    if (relu) a = _mm256_max_ps(a, _mm256_setzero_ps());
    _mm256_storeu_ps(y + ch, a);
  }
};

// Arguments of one tile: the block's three input rows at the tile's first
// window pixel, the block's packed weights, and the output at the tile's first
// pixel (pixel stride ys floats), channel ch.
struct Tile {
  const float* rows[3];
  const float* weights;
  float* y;
  int64_t ys;
  int ch;
};

// 4 channels per group: a vector of 8 channels holds two groups, one per
// 128-bit lane. Rotating the input within each lane by r = 0..3 lines input
// channel (o + r) % 4 up with output o, so every input pixel is loaded and
// rotated once and then feeds up to three output pixels.
// Weights: [kh][kw][r][8].
template <int S, int T>
__attribute__((noinline)) void tile_cg4(const Tile& tile, const Epilogue& e) {
  constexpr int P = (T - 1) * S + 3;
  __m256 acc[T];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
#pragma GCC unroll 1
  for (int kh = 0; kh < 3; ++kh) {
    const float* xr = tile.rows[kh];
    const float* wk = tile.weights + kh * 96;
#pragma GCC unroll 32
    for (int p = 0; p < P; ++p) {
      // Keeps the 12 weight vectors as memory operands of the FMAs: hoisted
      // into registers they would push the sums out to the stack.
      asm("" : "+r"(wk));
      const __m256 x0 = _mm256_load_ps(xr + p * 8);
      const __m256 x1 = _mm256_permute_ps(x0, 0x39);
      const __m256 x2 = _mm256_permute_ps(x0, 0x4E);
      const __m256 x3 = _mm256_permute_ps(x0, 0x93);
#pragma GCC unroll 3
      for (int kw = 0; kw < 3; ++kw) {
        const int d = p - kw;
        if (d < 0 || d % S != 0 || d / S >= T) continue;
        const int t = d / S;
        const float* w = wk + kw * 32;
        acc[t] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w), acc[t]);
        acc[t] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w + 8), acc[t]);
        acc[t] = _mm256_fmadd_ps(x2, _mm256_loadu_ps(w + 16), acc[t]);
        acc[t] = _mm256_fmadd_ps(x3, _mm256_loadu_ps(w + 24), acc[t]);
      }
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) e.store(tile.y + t * tile.ys, acc[t], tile.ch);
}

// CG = 8 or more channels per group, V output vectors per pass: broadcast one
// input channel, multiply by V weight vectors. Weights: [kh][kw][j][8V].
template <int S, int T, int CG, int V>
__attribute__((noinline)) void tile_bcast(const Tile& tile, const Epilogue& e) {
  __m256 acc[T][V];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[t][v] = _mm256_setzero_ps();
#pragma GCC unroll 1
  for (int kh = 0; kh < 3; ++kh) {
#pragma GCC unroll 3
    for (int kw = 0; kw < 3; ++kw) {
      const float* xk = tile.rows[kh] + kw * CG;
      const float* wk = tile.weights + (kh * 3 + kw) * CG * V * 8;
#pragma GCC unroll 4
      for (int j = 0; j < CG; ++j) {
        __m256 wv[V];
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) wv[v] = _mm256_loadu_ps(wk + j * V * 8 + v * 8);
#pragma GCC unroll 16
        for (int t = 0; t < T; ++t) {
          const __m256 b = _mm256_broadcast_ss(xk + t * S * CG + j);
#pragma GCC unroll 4
          for (int v = 0; v < V; ++v) acc[t][v] = _mm256_fmadd_ps(b, wv[v], acc[t][v]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) e.store(tile.y + t * tile.ys, acc[t][v], tile.ch + v * 8);
}

using TileFn = void (*)(const Tile&, const Epilogue&);

// Kernels for tiles of 1..T pixels, so a row splits into even tiles.
template <template <int> class K, int... Ts>
constexpr std::array<TileFn, sizeof...(Ts) + 1> tile_table(std::integer_sequence<int, Ts...>) {
  return {nullptr, &K<Ts + 1>::run...};
}

template <int S>
struct Cg4 {
  static constexpr int kMaxT = 8;
  template <int T>
  struct K {
    static void run(const Tile& t, const Epilogue& e) { tile_cg4<S, T>(t, e); }
  };
};

// With V vectors per pass, T * V sums, V weights and a broadcast fill AVX2's 16
// registers: T = 14 for one vector (8 channels per group), 6 for two.
template <int S, int CG>
struct Bcast {
  static constexpr int V = pass_width(CG) / 8;
  static constexpr int kMaxT = V == 1 ? 14 : 6;
  template <int T>
  struct K {
    static void run(const Tile& t, const Epilogue& e) { tile_bcast<S, T, CG, V>(t, e); }
  };
};

// Packs TF-layout weights [3][3][cg][cout] into the order the tiles read.
void pack_weights(const Conv& s, const float* w, float* packed) {
  if (s.cg == 4) {  // [cout / 8][kh][kw][r][8]
    for (int cb = 0; cb < s.cout / 8; ++cb)
      for (int k = 0; k < 9; ++k)
        for (int r = 0; r < 4; ++r)
          for (int l = 0; l < 8; ++l)
            packed[((cb * 9 + k) * 4 + r) * 8 + l] =
                w[(k * 4 + (((l & 3) + r) & 3)) * s.cout + cb * 8 + l];
    return;
  }
  const int pass = pass_width(s.cg);
  int64_t i = 0;  // [g][pass][kh][kw][j][pass channels]
  for (int g = 0; g < s.groups; ++g)
    for (int p = 0; p < s.cg; p += pass)
      for (int k = 0; k < 9; ++k)
        for (int j = 0; j < s.cg; ++j)
          for (int o = 0; o < pass; ++o)
            packed[i++] = w[(static_cast<int64_t>(k) * s.cg + j) * s.cout + g * s.cg + p + o];
}

// One output row (n, oh) for every block of channels.
template <int S, class Family>
void conv_row(const Conv& s, RowRing& ring, const float* x, const float* packed, float* y,
              int n, int oh) {
  static constexpr auto kTiles =
      tile_table<Family::template K>(std::make_integer_sequence<int, Family::kMaxT>());
  const int bw = block_width(s.cg);
  const int64_t width = padded_width(s);
  const float* rows[3];
  for (int kh = 0; kh < 3; ++kh) rows[kh] = ring.row(s, x, n, oh * S + kh);
  float* yrow = y + (static_cast<int64_t>(n) * s.ho + oh) * s.wo * s.cout;
  const int tiles = (s.wo + Family::kMaxT - 1) / Family::kMaxT;
  const int pass = pass_width(s.cg);
  const int64_t pass_weights = 9 * static_cast<int64_t>(s.cg) * pass;
  const Epilogue e{s.scale, s.offset, s.relu};
  for (int b = 0; b < s.c / bw; ++b) {
    for (int p = 0; p < bw; p += pass) {
      Tile tile;
      tile.weights = packed + (static_cast<int64_t>(b) * bw + p) / pass * pass_weights;
      tile.ys = s.cout;
      tile.ch = b * bw + p;
      // Even tiles: the first (wo % tiles) get one pixel more.
      for (int i = 0, ow0 = 0; i < tiles; ++i) {
        const int size = s.wo / tiles + (i < s.wo % tiles ? 1 : 0);
        for (int kh = 0; kh < 3; ++kh)
          tile.rows[kh] = rows[kh] + (b * width + static_cast<int64_t>(ow0) * S) * bw;
        tile.y = yrow + static_cast<int64_t>(ow0) * s.cout;
        kTiles[size](tile, e);
        ow0 += size;
      }
    }
  }
}

using RowFn = void (*)(const Conv&, RowRing&, const float*, const float*, float*, int, int);

RowFn select_row(int cg, int stride) {
  const bool s1 = stride == 1;
  switch (cg) {
    case 4: return s1 ? conv_row<1, Cg4<1>> : conv_row<2, Cg4<2>>;
    case 8: return s1 ? conv_row<1, Bcast<1, 8>> : conv_row<2, Bcast<2, 8>>;
    case 16: return s1 ? conv_row<1, Bcast<1, 16>> : conv_row<2, Bcast<2, 16>>;
    case 32: return s1 ? conv_row<1, Bcast<1, 32>> : conv_row<2, Bcast<2, 32>>;
  }
  return nullptr;
}

}  // namespace
