  // CUDA twin of attention_decode.metal: a block of NSG warps per (batch, query head). The grid is whole blocks
  // (32 * NSG threads by Hq by B), so nothing past the ranges runs; the checks below keep that true if it changes.
  constexpr int E = (D + 31) / 32;
  const int lane = threadIdx.x % 32;
  const int sg = threadIdx.x / 32;
  const int hq = blockIdx.y;
  const int b = blockIdx.z;
  const int Hq = q_shape[1];
  const int Hkv = k_shape[1];
  const int capacity = k_shape[2];
  if (hq >= Hq || b >= q_shape[0]) {
    return;
  }
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
    float s = mlxc_warp_sum(part) * scale;
    if (SOFTCAP) {
      s = softcap * tanhf(s / softcap);
    }
    const float m_new = fmaxf(m, s);
    const float f = expf(m - m_new);
    const float p = expf(s - m_new);
    l = l * f + p;
    for (int e = 0; e < E; ++e) {
      const int d = e * 32 + lane;
      o[e] = o[e] * f + (d < D ? p * static_cast<float>(v[base + size_t(i) * D + d]) : 0.0f);
    }
    m = m_new;
  }

  __shared__ float sm[NSG];
  __shared__ float sl[NSG];
  __shared__ float so[NSG][D];
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
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += 32 * NSG) {
    float mx = -INFINITY;
    for (int g = 0; g < NSG; ++g) {
      mx = fmaxf(mx, sm[g]);
    }
    float total = 0.0f;
    float acc = 0.0f;
    for (int g = 0; g < NSG; ++g) {
      const float w = sm[g] == -INFINITY ? 0.0f : expf(sm[g] - mx);
      total += sl[g] * w;
      acc += so[g][d] * w;
    }
    out[(size_t(b) * Hq + hq) * D + d] = static_cast<T>(acc / total);
  }
