"""Shared test settings."""

import os

import pytest
import torch

# Threads for the tests' own torch work. One by default: tiny models run fastest single-threaded, and several threads
# on 2 busy cores slow them down many times. The machine-independence check (test_machine_independence.py) re-runs the
# numerics tests with another count, which changes the order of parallel reductions.
TEST_THREADS = int(os.environ.get("TIMEVIPER_TEST_THREADS", "1"))


@pytest.fixture(autouse=True, scope="session")
def test_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "numerics: compares floats computed in different ways or processes; test_machine_independence.py re-runs "
        "these under another CPU kernel set and thread count",
    )
