  // Causal attention for T new tokens per head, K/V read straight from the cache buffers [B, Hkv, capacity, D]:
  // keys kv_start .. kv_start + kv_len - 1 in time order, the last T of them the queries' own positions, so query i
  // sits at key index i + kv_len - T. Tiled over queries and keys: a threadgroup of NSG SIMD-groups takes BQ =
  // NSG * QPS queries of one (batch, head); key tiles of BK keys go through threadgroup memory; every SIMD-group
  // runs an online softmax per query (lane i holds dims i, i + 32, ...; a score is one simd_sum). GQA by index,
  // WINDOW (keys closer than WINDOW positions) and SOFTCAP as in attention_decode.
  // Grid (32 * NSG, Hq * ceil(T / BQ), B), threadgroup (32 * NSG, 1, 1).
  constexpr int E = (D + 31) / 32;
  constexpr int BQ = NSG * QPS;
  const int lane = thread_index_in_simdgroup;
  const int sg = simdgroup_index_in_threadgroup;
  const int tid = thread_index_in_threadgroup;
  const int Hq = q_shape[1];
  const int Tq = q_shape[2];
  const int Hkv = k_shape[1];
  const int capacity = k_shape[2];
  const int qtiles = (Tq + BQ - 1) / BQ;
  const int hq = threadgroup_position_in_grid.y / qtiles;
  const int q_lo = (threadgroup_position_in_grid.y % qtiles) * BQ;
  const int b = threadgroup_position_in_grid.z;
  const int hk = hq / GQA;
  const int kv_start = params[0];
  const int kv_len = params[1];
  const int shift = kv_len - Tq;
  const float scale = fparams[0];
  const float softcap = fparams[1];

  threadgroup float Ks[BK][D];
  threadgroup float Vs[BK][D];

  float qr[QPS][E];
  float o[QPS][E];
  float m[QPS];
  float l[QPS];
  for (int r = 0; r < QPS; ++r) {
    const int qi = q_lo + sg * QPS + r;
    for (int e = 0; e < E; ++e) {
      const int d = e * 32 + lane;
      qr[r][e] = (qi < Tq && d < D) ? static_cast<float>(q[((size_t(b) * Hq + hq) * Tq + qi) * D + d]) : 0.0f;
      o[r][e] = 0.0f;
    }
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }

  // keys any query of this tile may see
  const int k_hi = min(Tq, q_lo + BQ) - 1 + shift;
  const int k_lo = WINDOW > 0 ? max(0, q_lo + shift - WINDOW + 1) : 0;
  const size_t base = ((size_t(b) * Hkv + hk) * capacity + kv_start) * D;
  for (int k0 = k_lo; k0 <= k_hi; k0 += BK) {
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous tile is consumed
    for (int e = tid; e < BK * D; e += 32 * NSG) {
      const int j = e / D;
      const int d = e % D;
      const bool in = k0 + j <= k_hi;
      Ks[j][d] = in ? static_cast<float>(k[base + size_t(k0 + j) * D + d]) : 0.0f;
      Vs[j][d] = in ? static_cast<float>(v[base + size_t(k0 + j) * D + d]) : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const int kn = min(BK, k_hi - k0 + 1);
    for (int j = 0; j < kn; ++j) {
      const int kk = k0 + j;
      for (int r = 0; r < QPS; ++r) {
        float part = 0.0f;
        for (int e = 0; e < E; ++e) {
          const int d = e * 32 + lane;
          if (d < D) {
            part += qr[r][e] * Ks[j][d];
          }
        }
        float s = simd_sum(part) * scale;
        if (SOFTCAP) {
          s = softcap * metal::precise::tanh(s / softcap);
        }
        const int qi = q_lo + sg * QPS + r;
        const int qpos = qi + shift;
        if (qi < Tq && kk <= qpos && (WINDOW == 0 || qpos - kk < WINDOW)) {
          const float m_new = metal::max(m[r], s);
          const float f = metal::exp(m[r] - m_new);
          const float p = metal::exp(s - m_new);
          l[r] = l[r] * f + p;
          for (int e = 0; e < E; ++e) {
            const int d = e * 32 + lane;
            o[r][e] = o[r][e] * f + (d < D ? p * Vs[j][d] : 0.0f);
          }
          m[r] = m_new;
        }
      }
    }
  }
  for (int r = 0; r < QPS; ++r) {
    const int qi = q_lo + sg * QPS + r;
    if (qi < Tq) {
      for (int e = 0; e < E; ++e) {
        const int d = e * 32 + lane;
        if (d < D) {
          out[((size_t(b) * Hq + hq) * Tq + qi) * D + d] = static_cast<T>(o[r][e] / l[r]);
        }
      }
    }
  }
