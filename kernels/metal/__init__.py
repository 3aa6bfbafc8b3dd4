"""Metal kernels as MLX builds them, their CUDA twins and their plain-MLX references."""
