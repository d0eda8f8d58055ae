// Whether this CPU can run the AVX2 + FMA build of the kernels: the loader
// (`dpn_jax/ops/cpu_kernels.py`) asks the baseline build before it loads the other one.
// GCC's and Clang's `__builtin_cpu_supports` also checks that the OS saves the AVX registers.

extern "C" __attribute__((visibility("default"))) int DpnCpuSupportsAvx2Fma() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return 0;
#endif
}
