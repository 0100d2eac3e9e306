"""Test session plugins: a throwaway PostgreSQL server (tests/pg.py), and the thread count.

LEDGER_TEST_THREADS=N runs the session (and the processes it starts) on N torch threads:
another thread count splits float reductions otherwise, so a tolerance that only held for one
split shows up on the developers' machine (CI runs 1 as well as the default).
"""

import os

import torch

pytest_plugins = ["tests.pg", "tests.demo_workspace"]

if os.environ.get("LEDGER_TEST_THREADS"):
    _threads = int(os.environ["LEDGER_TEST_THREADS"])
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)  # subprocesses: the command-line tests'
