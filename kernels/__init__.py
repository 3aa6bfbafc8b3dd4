"""Custom kernels: Metal bodies with CUDA twins and plain-MLX references (metal/), the Metal emulator (emulator/),
the registry of which implementation each target runs, and `mlxc kernels check`. See kernels/README.md."""
