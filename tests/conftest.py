"""Shared test setup.

float64 is enabled for the whole run: convergence orders and exact identities are checked in x64.
Tests of float32 behaviour build float32 arrays explicitly (``jnp.float32``) and assert the dtype.
Multi-device tests run in a subprocess with ``jax_num_cpu_devices=8`` (see tests/test_multidevice.py),
so this process keeps the default single CPU device.
"""

import os

# Compiling, not running, dominates the suite (most tests compile small programs and run them
# briefly): with LLVM at -O0 a test file takes 20-25% less CPU time. The arithmetic is the same
# (XLA's fast math stays off); the few programs that run for seconds are compiled with LLVM's
# optimizations (tests/_xla.py). The notebooks' kernels and the subprocesses inherit the flag.
_flags = os.environ.get("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
