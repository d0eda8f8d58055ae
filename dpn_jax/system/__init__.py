"""Process and operating-system plumbing every tool shares, none of it about models or devices:
atomic outputs that never replace what dpn_jax did not write (`files`), the user cache
directories (`cache_dirs`) and JAX's persistent compilation cache in them
(`compilation_cache`), freed host memory kept for XLA's CPU steps (`host_memory`, set at import),
orbax's I/O failures in one line (`orbax_io`) and the environment switches' spelling of "off"
(`env_switches`).

The bottom layer beside `dpn_jax.errors`: it imports no other part of dpn_jax, so the model and
ops layers may use it. The device-mesh `Runner` is execution, in `dpn_jax.runtime`.
"""
