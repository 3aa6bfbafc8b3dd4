  // CUDA twin of mamba2_state_update.metal; threads past P * W (grid rounded up to blocks) idle.
  constexpr int NPL = N / W;
  const int gx = blockIdx.x * blockDim.x + threadIdx.x;
  const int h = blockIdx.y * blockDim.y + threadIdx.y;
  const int b = blockIdx.z * blockDim.z + threadIdx.z;
  const int p = gx / W;
  const int j = gx % W;
  if (p >= P || h >= H || b >= x_shape[0]) {
    return;
  }
  const int g = h / (H / G);
  float dt = mlxc_softplus(static_cast<float>(dt_in[b * H + h]) + dt_bias[h]);
  if (DT_LIMIT) {
    dt = fminf(fmaxf(dt, dt_limit[0]), dt_limit[1]);
  }
  const float dA = expf(A[h] * dt);
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
