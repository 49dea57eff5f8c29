"""Benchmark harness of mtlopt against its peers (run: python -m benchmarks.step_time)."""
