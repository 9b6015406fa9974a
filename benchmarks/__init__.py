"""Benchmarks: scripts that time the serving path and save their numbers."""
