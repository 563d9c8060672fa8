"""Test setup: JAX on CPU with 8 fake devices (for the sharding tests), and no hub access."""

import collections
import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402


@pytest.fixture
def report(request):
    """Records a measured figure (e.g. a parity error) to print in the terminal summary. It travels
    on the test's report, so that it reaches the summary from a pytest-xdist worker too."""
    return lambda line: request.node.user_properties.append(("figure", line))


def pytest_terminal_summary(terminalreporter):
    figures = [
        value
        for reports in terminalreporter.stats.values()
        for r in reports
        if getattr(r, "when", None) == "call"
        for key, value in getattr(r, "user_properties", ())
        if key == "figure"
    ]
    if figures:
        terminalreporter.section("measured figures")
        for line in figures:
            terminalreporter.write_line(line)


# pytest-xdist (--dist loadfile) hands out files in collection order as workers free up. Its default
# order, most tests first, sent the one-test SuperLink file (2.5 min, mostly waiting out Flower's
# heartbeat window) last, to run alone; all longest-first (the heavy multi-process files side by side)
# was slower still in a fresh-clone run (25:03 against 23:03). So: that file first, then xdist's
# order (Makefile: --no-loadscope-reorder, so that this order is the one used).
FIRST = ("test_flower_deploy.py",)


def pytest_collection_modifyitems(config, items):
    counts = collections.Counter(item.path.name for item in items)
    items.sort(key=lambda item: (item.path.name not in FIRST, -counts[item.path.name]))  # stable within a file
