  // CUDA twin of mamba2_chunk_scan.metal: one block of TG threads per (batch, head, PT slice); the grid is whole
  // blocks already, so only the sequence end needs care (as in the Metal body).
  const int L = x_shape[1];
  const int tid = threadIdx.x;
  const int ptiles = P / PT;
  const int h = blockIdx.y / ptiles;
  const int p0 = (blockIdx.y % ptiles) * PT;
  const int b = blockIdx.z;
  const int g = h / (H / G);
  const float Ah = A[h];
  const float bias = dt_bias[h];
  const float skip = D[h];

  __shared__ float Bs[Q][N];
  __shared__ float Cs[Q][N];
  __shared__ float xs[Q][PT];
  __shared__ float st[PT][N];
  __shared__ float M[Q][Q];
  __shared__ float dts[Q];
  __shared__ float acum[Q];

  for (int e = tid; e < PT * N; e += TG) {
    st[e / N][e % N] = HAS_H0 ? static_cast<float>(h0[((size_t(b) * H + h) * P + p0 + e / N) * N + e % N]) : 0.0f;
  }
  for (int c0 = 0; c0 < L; c0 += Q) {
    const int len = min(Q, L - c0);
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
          dt = fminf(fmaxf(dt, dt_limit[0]), dt_limit[1]);
        }
      }
      dts[tid] = dt;
    }
    __syncthreads();
    if (tid < 32) {
      float v = tid < Q ? dts[tid] * Ah : 0.0f;
      for (int o = 1; o < 32; o *= 2) {
        const float t = __shfl_up_sync(0xffffffffu, v, o);
        if (tid >= o) {
          v += t;
        }
      }
      if (tid < Q) {
        acum[tid] = v;
      }
    }
    __syncthreads();
    for (int e = tid; e < Q * Q; e += TG) {
      const int l = e / Q;
      const int s = e % Q;
      float v = 0.0f;
      if (s <= l) {
        float cb = 0.0f;
        for (int n = 0; n < N; ++n) {
          cb += Cs[l][n] * Bs[s][n];
        }
        v = cb * expf(acum[l] - acum[s]) * dts[s];
      }
      M[l][s] = v;
    }
    __syncthreads();
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
        v += expf(acum[l]) * carried + skip * xs[l][pp];
        y[((size_t(b) * L + c0 + l) * H + h) * P + p0 + pp] = static_cast<T>(v);
      }
    }
    __syncthreads();
    const float last = acum[Q - 1];
    for (int e = tid; e < PT * N; e += TG) {
      const int pp = e / N;
      const int n = e % N;
      float v = expf(last) * st[pp][n];
      for (int s = 0; s < len; ++s) {
        v += expf(last - acum[s]) * dts[s] * xs[s][pp] * Bs[s][n];
      }
      st[pp][n] = v;
    }
    __syncthreads();
  }
  for (int e = tid; e < PT * N; e += TG) {
    h_out[((size_t(b) * H + h) * P + p0 + e / N) * N + e % N] = st[e / N][e % N];
  }
