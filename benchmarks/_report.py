"""Write one benchmark's section into ``benchmarks/RESULTS.md`` (other sections are kept)."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import jax

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nWritten by the scripts in `benchmarks/`; each owns one section.\n"


def load_average() -> str:
    """The 1/5/15-minute load averages: on a shared CPU, timings carry this caveat."""
    if not hasattr(os, "getloadavg"):
        return "n/a"
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def machine() -> str:
    """One line naming the machine: CPU count, platform, device kind, jax version, and the load
    average when the section is written (a busy CPU slows every timing above)."""
    dev = jax.devices()[0]
    return (
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, "
        f"{jax.default_backend()} ({dev.device_kind}), jax {jax.__version__}, "
        f"Python {platform.python_version()}; load average {load_average()} (1/5/15 min)"
    )


def write_section(name: str, markdown: str, path: Path = RESULTS) -> Path:
    """Replace (or append) the section ``name`` of ``RESULTS.md`` with ``markdown``."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.strip()}\n\nMachine: {machine()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text}\n{block}\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
