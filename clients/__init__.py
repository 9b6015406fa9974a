"""Python client for the served pipeline, over HTTP and gRPC."""
