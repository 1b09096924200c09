"""Compiler options for the few runtime-bound programs of the suite (not a test module).

tests/conftest.py compiles at LLVM -O0: most tests compile small programs and run them briefly.
A program that runs for seconds (thousands of steps on many samples, the Inception network) is
compiled with ``jax.jit(..., compiler_options=OPTIMIZED)`` instead, LLVM's optimizations on.
"""

OPTIMIZED = {"xla_backend_optimization_level": 2}
