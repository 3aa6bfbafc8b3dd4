  // CUDA twin of selective_state_update.metal; threads past Dm * W (grid rounded up to blocks) idle.
  constexpr int NPL = N / W;
  const int Dm = u_shape[1];
  const int gx = blockIdx.x * blockDim.x + threadIdx.x;
  const int b = blockIdx.y * blockDim.y + threadIdx.y;
  const int d = gx / W;
  const int j = gx % W;
  if (d >= Dm || b >= u_shape[0]) {
    return;
  }
  const size_t row = size_t(b) * Dm + d;
  const float x = static_cast<float>(u[row]);
  const float dt = mlxc_softplus(static_cast<float>(delta[row]) + dt_bias[d]);
  float acc = 0.0f;
  for (int i = 0; i < NPL; ++i) {
    const int n = i * W + j;
    const float s = expf(A[d * N + n] * dt) * static_cast<float>(state[row * N + n])
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
