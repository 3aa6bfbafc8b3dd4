  // Attention for one new token per head, reading K/V straight from the cache buffers [B, Hkv, capacity, D]:
  // keys kv_start .. kv_start + kv_len - 1, in time order, the last one the query's own position.
  // One threadgroup per (batch, query head) with NSG SIMD-groups; SIMD-group s takes keys s, s + NSG, ... and
  // keeps a running max / sum / output (online softmax); lane i holds dims i, i + 32, ... of q and the output, so a
  // score is one simd_sum. GQA by index: query head hq reads KV head hq / GQA. WINDOW > 0 keeps the keys whose
  // distance to the query is below WINDOW; SOFTCAP squashes scores to softcap * tanh(score / softcap).
  // Grid (32 * NSG, Hq, B), threadgroup (32 * NSG, 1, 1).
  constexpr int E = (D + 31) / 32;
  const int lane = thread_index_in_simdgroup;
  const int sg = simdgroup_index_in_threadgroup;
  const int hq = threadgroup_position_in_grid.y;
  const int b = threadgroup_position_in_grid.z;
  const int Hq = q_shape[1];
  const int Hkv = k_shape[1];
  const int capacity = k_shape[2];
  const int hk = hq / GQA;
  const int kv_start = params[0];
  const int kv_len = params[1];
  const float scale = fparams[0];
  const float softcap = fparams[1];

  float qr[E];
  float o[E];
  for (int e = 0; e < E; ++e) {
    const int d = e * 32 + lane;
    qr[e] = d < D ? static_cast<float>(q[(size_t(b) * Hq + hq) * D + d]) : 0.0f;
    o[e] = 0.0f;
  }
  const size_t base = ((size_t(b) * Hkv + hk) * capacity + kv_start) * D;
  const int first = WINDOW > 0 ? max(0, kv_len - WINDOW) : 0;
  float m = -INFINITY;
  float l = 0.0f;
  for (int i = first + sg; i < kv_len; i += NSG) {
    float part = 0.0f;
    for (int e = 0; e < E; ++e) {
      const int d = e * 32 + lane;
      if (d < D) {
        part += qr[e] * static_cast<float>(k[base + size_t(i) * D + d]);
      }
    }
    float s = simd_sum(part) * scale;
    if (SOFTCAP) {
      s = softcap * metal::precise::tanh(s / softcap);
    }
    const float m_new = metal::max(m, s);
    const float f = metal::exp(m - m_new);
    const float p = metal::exp(s - m_new);
    l = l * f + p;
    for (int e = 0; e < E; ++e) {
      const int d = e * 32 + lane;
      o[e] = o[e] * f + (d < D ? p * static_cast<float>(v[base + size_t(i) * D + d]) : 0.0f);
    }
    m = m_new;
  }

  // combine the SIMD-groups' partial softmaxes
  threadgroup float sm[NSG];
  threadgroup float sl[NSG];
  threadgroup float so[NSG][D];
  if (lane == 0) {
    sm[sg] = m;
    sl[sg] = l;
  }
  for (int e = 0; e < E; ++e) {
    const int d = e * 32 + lane;
    if (d < D) {
      so[sg][d] = o[e];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int d = thread_index_in_threadgroup; d < D; d += 32 * NSG) {
    float mx = -INFINITY;
    for (int g = 0; g < NSG; ++g) {
      mx = metal::max(mx, sm[g]);
    }
    float total = 0.0f;
    float acc = 0.0f;
    for (int g = 0; g < NSG; ++g) {
      const float w = sm[g] == -INFINITY ? 0.0f : metal::exp(sm[g] - mx);
      total += sl[g] * w;
      acc += so[g][d] * w;
    }
    out[(size_t(b) * Hq + hq) * D + d] = static_cast<T>(acc / total);
  }
