"""The device the fidelity tests run the engine and the circuits on: ``WEIGHTLENS_TEST_DEVICE`` (default
``cpu``; ``benchmarks/gpu_check.sh`` sets ``cuda``). Results come back to the CPU, where transformers' reference
values are computed."""

import os

DEVICE = os.environ.get("WEIGHTLENS_TEST_DEVICE", "cpu")
