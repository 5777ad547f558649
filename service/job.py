"""One record per request in the core: a ``Job`` owns its keep rate (fixed, or auto's choice, lowered only
by the scheduler) from admission to answer; ``Ask`` holds the scheduling options as the API takes them."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


class Slot(Protocol):
    """An admission slot (``service.modelqueue.Ticket``): released when the job's batch is formed."""

    def release(self) -> None: ...


class Priority(IntEnum):
    """Scheduling class, in run order."""

    HIGH = 0
    NORMAL = 1
    LOW = 2

    @property
    def label(self) -> str:
        """The API's and the metrics' name: "high", "normal" or "low"."""
        return self.name.lower()


PRIORITIES = tuple(p.label for p in Priority)  # the API's choices, in run order


@dataclass(frozen=True)
class Ask:
    """A request's scheduling options as the API takes them."""

    auto: bool = False  # keep_rate=auto
    min_keep_rate: float | None = None  # auto's floor; None: the service's setting
    deadline_ms: float | None = None  # from the request's arrival; None: only the request timeout
    priority: Priority = Priority.NORMAL

    @classmethod
    def of(cls, keep_rate: object, min_keep_rate: float | None, deadlines_ms: tuple[float | None, ...],
           priority: str) -> Ask:
        """From validated API values: ``keep_rate`` as given ("auto" or a number); of the deadlines given
        (parameter, ``X-Deadline-Ms`` header), the smallest counts; ``priority`` one of ``PRIORITIES``."""
        given = [d for d in deadlines_ms if d is not None]
        return cls(keep_rate == "auto", min_keep_rate, min(given) if given else None, Priority[priority.upper()])


@dataclass(eq=False)
class Job:
    """One request, as the scheduler, the queue and the device worker see it. Times are clock seconds."""

    rate: float  # the keep rate it runs at: fixed, or auto's current choice
    deadline: float  # hard: refused or shed rather than finished later
    priority: Priority = Priority.NORMAL
    auto: bool = False
    min_rate: float = 1.0  # auto: the lowest keep rate it accepts
    target: float = math.inf  # auto: finish by then if any rate allows (the latency target)
    arrival: float = 0.0  # when the request arrived
    # what the pass needs, and the request's progress through the queue
    tensor: torch.Tensor | None = None  # C, H, W (float32, from the preprocessor)
    top_k: int = 1
    want_kept: bool = False
    future: asyncio.Future[Any] | None = None  # its SampleResult, or the core exception that ended it
    ticket: Slot | None = None  # its admission slot
    enqueued: float = 0.0  # when it joined the queue (decoded)
    queue_s: float = 0.0  # time from enqueued to its batch being formed

    def __post_init__(self) -> None:
        self.priority = Priority(self.priority)

    @property
    def due(self) -> float:
        return min(self.deadline, self.target)

    @property
    def floor(self) -> float:
        """The lowest rate it may run at: auto's minimum, else its fixed rate."""
        return self.min_rate if self.auto else self.rate
