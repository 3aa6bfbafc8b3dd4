  // One Mamba-2 decode step (transformers' Mamba2Mixer recurrent form): per head h a scalar decay.
  //   dt = softplus(dt + dt_bias[h]) (clamped to dt_limit when DT_LIMIT);  dA = exp(A[h] * dt)
  //   s[p, n] = dA * state[p, n] + dt * x[p] * B[g, n];  y[p] = sum_n s[p, n] * C[g, n] + D[h] * x[p]
  // Heads share B and C by group: g = h / (H / G). W lanes per (head, p) row, N / W states per lane;
  // grid (P * W, H, batch).
  constexpr int NPL = N / W;
  const int p = thread_position_in_grid.x / W;
  const int j = thread_position_in_grid.x % W;
  const int h = thread_position_in_grid.y;
  const int b = thread_position_in_grid.z;
  const int g = h / (H / G);

  float dt = mlxc_softplus(static_cast<float>(dt_in[b * H + h]) + dt_bias[h]);
  if (DT_LIMIT) {
    dt = metal::clamp(dt, dt_limit[0], dt_limit[1]);
  }
  const float dA = metal::exp(A[h] * dt);
  const size_t row = (size_t(b) * H + h) * P + p;
  const float xv = static_cast<float>(x[row]);
  const size_t bc = (size_t(b) * G + g) * N;
  float acc = 0.0f;
  for (int i = 0; i < NPL; ++i) {
    const int n = i * W + j;
    const float s = dA * static_cast<float>(state[row * N + n]) + dt * xv * static_cast<float>(Bm[bc + n]);
    state_out[row * N + n] = static_cast<S>(s);
    acc += s * static_cast<float>(Cm[bc + n]);
  }
  acc = mlxc_lane_sum<W>(acc);
  if (j == 0) {
    y[row] = static_cast<T>(acc + xv * D[h]);
  }
