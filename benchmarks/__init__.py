"""Service and scheduling benchmarks, run from the repository root (``python -m benchmarks.service``,
``python -m benchmarks.scheduling``); their servers and loopback load live in ``benchmarks.servers``."""
