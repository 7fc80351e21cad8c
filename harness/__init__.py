"""Real peers for tests and benchmarks: a Realtime stub server and an aiortc caller."""
