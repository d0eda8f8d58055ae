"""Operations whose lowering depends on the backend: convolutions and dpn_jax's CPU kernels."""
