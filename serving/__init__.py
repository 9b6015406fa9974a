"""The embedded Triton server: start, wait until ready, stop."""
