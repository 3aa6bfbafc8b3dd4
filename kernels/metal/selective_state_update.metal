  // One Mamba decode step: the cached state advances by one token (transformers' selective_state_update).
  //   dt = softplus(delta + dt_bias[d]);  s[n] = exp(A[d, n] * dt) * state[n] + dt * B[n] * u[d]
  //   y[d] = (sum_n s[n] * C[n] + D[d] * u[d]) * silu(z[d])
  // W lanes per channel, N / W states per lane; grid (Dm * W, batch, 1).
  constexpr int NPL = N / W;
  const int Dm = u_shape[1];
  const int d = thread_position_in_grid.x / W;
  const int j = thread_position_in_grid.x % W;
  const int b = thread_position_in_grid.y;

  const size_t row = size_t(b) * Dm + d;
  const float x = static_cast<float>(u[row]);
  const float dt = mlxc_softplus(static_cast<float>(delta[row]) + dt_bias[d]);
  float acc = 0.0f;
  for (int i = 0; i < NPL; ++i) {
    const int n = i * W + j;
    const float s = metal::exp(A[d * N + n] * dt) * static_cast<float>(state[row * N + n])
        + dt * static_cast<float>(Bm[size_t(b) * N + n]) * x;
    state_out[row * N + n] = static_cast<S>(s);
    acc += s * static_cast<float>(Cm[size_t(b) * N + n]);
  }
  acc = mlxc_lane_sum<W>(acc);
  if (j == 0) {
    float out = acc + x * D[d];
    if (HAS_Z) {
      out *= mlxc_silu(static_cast<float>(z[row]));
    }
    y[row] = static_cast<T>(out);
  }
