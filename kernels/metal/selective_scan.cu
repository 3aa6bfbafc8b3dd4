  // CUDA twin of selective_scan.metal. MLX rounds the grid up to whole blocks: threads past Dm * W idle.
  constexpr int NPL = N / W;
  const int L = u_shape[1];
  const int Dm = u_shape[2];
  const int gx = blockIdx.x * blockDim.x + threadIdx.x;
  const int b = blockIdx.y * blockDim.y + threadIdx.y;
  const int d = gx / W;
  const int j = gx % W;
  if (d >= Dm || b >= u_shape[0]) {
    return;  // whole channels only: the W lanes of a channel stay together
  }

  float a[NPL];
  float h[NPL];
  for (int i = 0; i < NPL; ++i) {
    const int n = i * W + j;
    a[i] = A[d * N + n];
    h[i] = HAS_H0 ? static_cast<float>(h0[(size_t(b) * Dm + d) * N + n]) : 0.0f;
  }
  const float skip = D[d];
  const float bias = dt_bias[d];
  for (int t = 0; t < L; ++t) {
    const size_t row = size_t(b) * L + t;
    const float x = static_cast<float>(u[row * Dm + d]);
    const float dt = mlxc_softplus(static_cast<float>(delta[row * Dm + d]) + bias);
    float acc = 0.0f;
    for (int i = 0; i < NPL; ++i) {
      const int n = i * W + j;
      h[i] = expf(a[i] * dt) * h[i] + dt * static_cast<float>(Bm[row * N + n]) * x;
      acc += h[i] * static_cast<float>(Cm[row * N + n]);
    }
    acc = mlxc_lane_sum<W>(acc);
    if (j == 0) {
      float out = acc + x * skip;
      if (HAS_Z) {
        out *= mlxc_silu(static_cast<float>(z[row * Dm + d]));
      }
      y[row * Dm + d] = static_cast<T>(out);
    }
  }
  for (int i = 0; i < NPL; ++i) {
    h_out[(size_t(b) * Dm + d) * N + i * W + j] = h[i];
  }
