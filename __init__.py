"""mlxc: a graph-IR compiler for language models that targets MLX."""
