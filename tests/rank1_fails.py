"""Imported by a config in tests/test_distributed.py: fails on rank 1 only, as a rank on a node without
a file would (rank 0 goes on, into the process group, and must not wait forever)."""

import os

if os.environ.get("RANK") == "1":
    raise RuntimeError("rank 1 cannot import what rank 0 can")
