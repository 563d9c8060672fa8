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


# The test files that take longest, longest first (per-file sums of --durations in `make test` runs).
# With `--no-loadscope-reorder` (Makefile) pytest-xdist hands out files in collection order as workers
# free up, so the long ones start early and none is left to run alone at the end. (xdist's default
# orders files by their number of tests, which put the one-test SuperLink file last: 2.5 min alone.)
SLOW_FILES = (
    "test_deploy.py", "test_dp.py", "test_plan.py", "test_lora.py", "test_train.py", "test_flower_deploy.py",
    "test_flower.py", "test_reproduce.py", "test_comm.py", "test_mt_bench.py", "test_eval.py",
    "test_fedbuff_deploy.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: a file's tests in order
