"""Shared test setup.

float64 is enabled for the whole run: convergence orders and exact identities are checked in x64.
Tests of float32 behaviour build float32 arrays explicitly (``jnp.float32``) and assert the dtype.
Multi-device tests run in a subprocess with ``jax_num_cpu_devices=8`` (see tests/test_multidevice.py),
so this process keeps the default single CPU device.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
