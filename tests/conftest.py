# Import mlxc before anything loads mlx.core, so its fast-BLAS preload takes effect for the whole test run.
import mlxc  # noqa: F401
