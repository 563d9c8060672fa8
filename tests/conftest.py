"""Test setup: JAX on CPU with 8 fake devices (for the sharding tests), and no hub access."""

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
