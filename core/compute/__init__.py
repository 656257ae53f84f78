"""The engine: exact per-row statistics of score matrices without materialising them, and its compiled CPU kernel."""
