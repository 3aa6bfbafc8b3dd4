  // Mamba selective scan over a whole sequence (transformers' MambaMixer, sequential form).
  // One channel d of one batch row b per W lanes; each lane keeps N / W states in registers.
  //   dt = softplus(delta + dt_bias[d]);  h[n] = exp(A[d, n] * dt) * h[n] + dt * B[t, n] * u[t, d]
  //   y[t, d] = (sum_n h[n] * C[t, n] + D[d] * u[t, d]) * silu(z[t, d])      (the gate when HAS_Z)
  // Grid (Dm * W, batch, 1): exact, so no bounds checks.
  constexpr int NPL = N / W;
  const int L = u_shape[1];
  const int Dm = u_shape[2];
  const int d = thread_position_in_grid.x / W;
  const int j = thread_position_in_grid.x % W;
  const int b = thread_position_in_grid.y;

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
      h[i] = metal::exp(a[i] * dt) * h[i] + dt * static_cast<float>(Bm[row * N + n]) * x;
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
