  // CUDA twin of attention_prefill.metal: a block of NSG warps per (batch, head, BQ queries); K/V tiles in shared
  // memory. Query rows past T (the last tile) stay in the block for its barriers but neither read nor write.
  constexpr int E = (D + 31) / 32;
  constexpr int BQ = NSG * QPS;
  const int lane = threadIdx.x % 32;
  const int sg = threadIdx.x / 32;
  const int tid = threadIdx.x;
  const int Hq = q_shape[1];
  const int Tq = q_shape[2];
  const int Hkv = k_shape[1];
  const int capacity = k_shape[2];
  const int qtiles = (Tq + BQ - 1) / BQ;
  if (blockIdx.y >= Hq * qtiles || blockIdx.z >= q_shape[0]) {
    return;  // the whole block: no barrier is left waiting
  }
  const int hq = blockIdx.y / qtiles;
  const int q_lo = (blockIdx.y % qtiles) * BQ;
  const int b = blockIdx.z;
  const int hk = hq / GQA;
  const int kv_start = params[0];
  const int kv_len = params[1];
  const int shift = kv_len - Tq;
  const float scale = fparams[0];
  const float softcap = fparams[1];

  __shared__ float Ks[BK][D];
  __shared__ float Vs[BK][D];

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
  const int k_hi = min(Tq, q_lo + BQ) - 1 + shift;
  const int k_lo = WINDOW > 0 ? max(0, q_lo + shift - WINDOW + 1) : 0;
  const size_t base = ((size_t(b) * Hkv + hk) * capacity + kv_start) * D;
  for (int k0 = k_lo; k0 <= k_hi; k0 += BK) {
    __syncthreads();
    for (int e = tid; e < BK * D; e += 32 * NSG) {
      const int j = e / D;
      const int d = e % D;
      const bool in = k0 + j <= k_hi;
      Ks[j][d] = in ? static_cast<float>(k[base + size_t(k0 + j) * D + d]) : 0.0f;
      Vs[j][d] = in ? static_cast<float>(v[base + size_t(k0 + j) * D + d]) : 0.0f;
    }
    __syncthreads();
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
        float s = mlxc_warp_sum(part) * scale;
        if (SOFTCAP) {
          s = softcap * tanhf(s / softcap);
        }
        const int qi = q_lo + sg * QPS + r;
        const int qpos = qi + shift;
        if (qi < Tq && kk <= qpos && (WINDOW == 0 || qpos - kk < WINDOW)) {
          const float m_new = fmaxf(m[r], s);
          const float f = expf(m[r] - m_new);
          const float p = expf(s - m_new);
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
