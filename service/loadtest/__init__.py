"""evit-loadtest: an open/closed-loop HTTP load generator reporting latency per keep rate."""

from service.loadtest.cli import main

__all__ = ["main"]
