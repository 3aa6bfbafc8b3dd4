  // Mamba-2 chunked SSD prefill (transformers' Mamba2Mixer.torch_forward / mamba2_chunk_scan). One threadgroup
  // walks the sequence of one (batch, head, PT-wide slice of the head dim) in chunks of Q steps, its state slice
  // [PT, N] in threadgroup memory. Per chunk, with a[l] = cumsum(dt * A[h]) inside the chunk:
  //   M[l, s]  = (C_l . B_s) * exp(a[l] - a[s]) * dt_s  for s <= l                       (intra-chunk, quadratic)
  //   y[l, p]  = sum_s M[l, s] x[s, p] + exp(a[l]) * (C_l . state[p]) + D[h] x[l, p]      (plus the carried state)
  //   state[p, n] <- exp(a[Q-1]) state[p, n] + sum_s exp(a[Q-1] - a[s]) dt_s x[s, p] B[s, n]
  // Steps past the sequence end get dt = 0 and zero inputs, which leaves the state and a[] unchanged.
  // Grid (TG, H * P / PT, batch) with threadgroups of (TG, 1, 1). Needs Q <= 32 (one SIMD-group scans a[]).
  const int L = x_shape[1];
  const int tid = thread_index_in_threadgroup;
  const int ptiles = P / PT;
  const int h = threadgroup_position_in_grid.y / ptiles;
  const int p0 = (threadgroup_position_in_grid.y % ptiles) * PT;
  const int b = threadgroup_position_in_grid.z;
  const int g = h / (H / G);
  const float Ah = A[h];
  const float bias = dt_bias[h];
  const float skip = D[h];

  threadgroup float Bs[Q][N];
  threadgroup float Cs[Q][N];
  threadgroup float xs[Q][PT];
  threadgroup float st[PT][N];
  threadgroup float M[Q][Q];
  threadgroup float dts[Q];
  threadgroup float acum[Q];

  for (int e = tid; e < PT * N; e += TG) {
    const int pp = e / N;
    const int n = e % N;
    st[pp][n] = HAS_H0 ? static_cast<float>(h0[((size_t(b) * H + h) * P + p0 + pp) * N + n]) : 0.0f;
  }
  for (int c0 = 0; c0 < L; c0 += Q) {
    const int len = min(Q, L - c0);
    // (1) the chunk's inputs
    for (int e = tid; e < Q * N; e += TG) {
      const int l = e / N;
      const int n = e % N;
      const size_t at = ((size_t(b) * L + c0 + l) * G + g) * N + n;
      Bs[l][n] = l < len ? static_cast<float>(Bm[at]) : 0.0f;
      Cs[l][n] = l < len ? static_cast<float>(Cm[at]) : 0.0f;
    }
    for (int e = tid; e < Q * PT; e += TG) {
      const int l = e / PT;
      const int pp = e % PT;
      xs[l][pp] = l < len ? static_cast<float>(x[((size_t(b) * L + c0 + l) * H + h) * P + p0 + pp]) : 0.0f;
    }
    if (tid < Q) {
      float dt = 0.0f;
      if (tid < len) {
        dt = mlxc_softplus(static_cast<float>(dt_in[(size_t(b) * L + c0 + tid) * H + h]) + bias);
        if (DT_LIMIT) {
          dt = metal::clamp(dt, dt_limit[0], dt_limit[1]);
        }
      }
      dts[tid] = dt;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // (2) cumulative log-decay inside the chunk
    if (simdgroup_index_in_threadgroup == 0) {
      const int lane = thread_index_in_simdgroup;
      const float v = lane < Q ? dts[lane] * Ah : 0.0f;
      const float c = simd_prefix_inclusive_sum(v);
      if (lane < Q) {
        acum[lane] = c;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // (3) the masked, decayed C.B matrix
    for (int e = tid; e < Q * Q; e += TG) {
      const int l = e / Q;
      const int s = e % Q;
      float v = 0.0f;
      if (s <= l) {
        float cb = 0.0f;
        for (int n = 0; n < N; ++n) {
          cb += Cs[l][n] * Bs[s][n];
        }
        v = cb * metal::exp(acum[l] - acum[s]) * dts[s];
      }
      M[l][s] = v;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // (4) outputs
    for (int e = tid; e < Q * PT; e += TG) {
      const int l = e / PT;
      const int pp = e % PT;
      if (l < len) {
        float v = 0.0f;
        for (int s = 0; s <= l; ++s) {
          v += M[l][s] * xs[s][pp];
        }
        float carried = 0.0f;
        for (int n = 0; n < N; ++n) {
          carried += Cs[l][n] * st[pp][n];
        }
        v += metal::exp(acum[l]) * carried + skip * xs[l][pp];
        y[((size_t(b) * L + c0 + l) * H + h) * P + p0 + pp] = static_cast<T>(v);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // (5) carry the state past the chunk
    const float last = acum[Q - 1];
    for (int e = tid; e < PT * N; e += TG) {
      const int pp = e / N;
      const int n = e % N;
      float v = metal::exp(last) * st[pp][n];
      for (int s = 0; s < len; ++s) {
        v += metal::exp(last - acum[s]) * dts[s] * xs[s][pp] * Bs[s][n];
      }
      st[pp][n] = v;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (int e = tid; e < PT * N; e += TG) {
    h_out[((size_t(b) * H + h) * P + p0 + e / N) * N + e % N] = st[e / N][e % N];
  }
