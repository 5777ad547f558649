"""The service core's own exceptions: what went wrong, in the core's terms, never an HTTP status.

The scheduler, batcher, queues, registry, runtime and worker raise these; ``service.errors`` maps each to
its HTTP status, error code and Retry-After in one place, for ``/classify`` and the V2 routes alike.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the core's exceptions; ``message`` is safe to show to the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Retryable(ServiceError):
    """A capacity problem: the same request may succeed after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(Retryable):
    """Models are loading or warming up."""


class Draining(Retryable):
    """The service is shutting down and admits nothing new."""


class Overloaded(Retryable):
    """The model's queue (or the priority's share of it) is full."""


class OutOfMemory(Retryable):
    """The device ran out of memory even for this request alone."""


class DeadlineUnreachable(ServiceError):
    """The request is predicted to finish after its deadline, so it is not run.

    ``retry_after_s``: when the current load is the reason (retrying later may help); ``None`` when only a
    longer deadline would (not even an idle model makes it, the deadline has passed, or its batch was shed).
    """

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueTimeout(ServiceError):
    """The request's deadline (or the request timeout) passed before it was answered."""


class UnknownModel(ServiceError):
    """No hosted model has the name asked for."""


class InvalidRequest(ServiceError):
    """A parameter the core checks against the model (e.g. more classes than it has)."""


class InferenceFailed(ServiceError):
    """The forward pass raised; only the requests of that pass get this."""


class ClientGone(ServiceError):
    """The client closed the connection before its answer was ready; the request was dropped."""
