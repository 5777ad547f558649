"""The load generator: open-loop (scheduled arrivals) and closed-loop (N clients) phases over HTTP.

Open loop: request ``i`` has a scheduled send time fixed before the run (Poisson or constant
arrivals) and its latency is measured from that time, not from when it actually left. A server that
stalls therefore shows its queueing in the latencies instead of silently slowing the load down (no
coordinated omission). How late the generator itself sent is reported separately (``client_send_lag``).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from service.loadtest import promscrape
from service.loadtest.stats import Recorder
from service.loadtest.workload import DEFAULT_RATE, Image, KeepRateMix, arrival_offsets

SETTLE_S = 0.2  # let the server finish updating its metrics after the last answer


@dataclass(frozen=True)
class Target:
    url: str  # base URL, e.g. http://127.0.0.1:8000
    endpoint: str = "/classify"
    model: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 30.0


@dataclass(frozen=True)
class Phase:
    """One measured step: ``rate`` (open loop) or ``concurrency`` (closed loop), bounded both ways."""

    duration: float
    rate: float | None = None
    concurrency: int | None = None
    arrivals: str = "poisson"
    max_requests: int | None = None

    @property
    def mode(self) -> str:
        return "open" if self.rate is not None else "closed"


class LoadGenerator:
    def __init__(
        self,
        target: Target,
        mix: KeepRateMix,
        images: list[Image],
        *,
        seed: int = 0,
        max_inflight: int = 512,
        on_answer: Callable[[], None] | None = None,
    ) -> None:
        if not images:
            raise ValueError("no images to send")
        self.target = target
        self.mix = mix
        self._rng = random.Random(seed)
        self._labels = mix.chooser(random.Random(seed + 1))
        self._images = itertools.cycle(images)
        self._max_inflight = max_inflight
        self._inflight = asyncio.Semaphore(max_inflight)
        self._on_answer = on_answer or (lambda: None)
        self._url = target.url.rstrip("/") + target.endpoint

    def client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self._max_inflight, max_keepalive_connections=self._max_inflight)
        # trust_env=False: never route loopback load through a proxy named in the environment.
        return httpx.AsyncClient(limits=limits, timeout=self.target.timeout, trust_env=False)

    async def _post(self, client: httpx.AsyncClient, label: str, image: Image) -> tuple[str, object]:
        params = dict(self.target.params)
        if label != DEFAULT_RATE:
            params["keep_rate"] = label
        if self.target.model:
            params["model"] = self.target.model
        headers = {"content-type": image.content_type, **self.target.headers}
        try:
            response = await client.post(self._url, params=params, content=image.data, headers=headers)
        except httpx.TimeoutException:
            return "timeout", None
        except httpx.TransportError:
            return "connection_error", None
        body = None
        if response.is_success and response.headers.get("content-type", "").startswith("application/json"):
            try:
                body = response.json()
            except ValueError:
                body = None
        return str(response.status_code), body

    async def _send(
        self, client: httpx.AsyncClient, label: str, image: Image, scheduled: float, rec: Recorder | None
    ) -> None:
        async with self._inflight:
            sent_at = time.perf_counter()
            status, body = await self._post(client, label, image)
        done = time.perf_counter()
        if rec is not None:
            rec.on_answer(label, status, done - scheduled, sent_at - scheduled, body)
        self._on_answer()

    async def run_phase(self, client: httpx.AsyncClient, phase: Phase, rec: Recorder | None) -> float:
        """Run ``phase`` (``rec=None``: a warm-up, not recorded); returns its seconds, drain included."""
        if phase.rate is not None:
            return await self._open(client, phase, rec)
        return await self._closed(client, phase, rec)

    async def _open(self, client: httpx.AsyncClient, phase: Phase, rec: Recorder | None) -> float:
        assert phase.rate is not None
        tasks: set[asyncio.Task] = set()
        start = time.perf_counter()
        for i, offset in enumerate(arrival_offsets(phase.rate, phase.arrivals, self._rng)):
            if offset >= phase.duration or (phase.max_requests is not None and i >= phase.max_requests):
                break
            scheduled = start + offset
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            label = next(self._labels)
            if rec is not None:
                rec.on_send(label)
            task = asyncio.create_task(self._send(client, label, next(self._images), scheduled, rec))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        return time.perf_counter() - start

    async def _closed(self, client: httpx.AsyncClient, phase: Phase, rec: Recorder | None) -> float:
        assert phase.concurrency is not None
        start = time.perf_counter()
        deadline = start + phase.duration
        issued = 0

        async def one_client() -> None:
            nonlocal issued
            while time.perf_counter() < deadline and (phase.max_requests is None or issued < phase.max_requests):
                issued += 1
                label = next(self._labels)
                if rec is not None:
                    rec.on_send(label)
                await self._send(client, label, next(self._images), time.perf_counter(), rec)

        await asyncio.gather(*(one_client() for _ in range(phase.concurrency)))
        return time.perf_counter() - start

    async def scrape(self, client: httpx.AsyncClient) -> tuple[promscrape.Snapshot | None, str | None]:
        """The server's metrics now, or (None, why) when they cannot be read."""
        url = self.target.url.rstrip("/") + "/metrics"
        try:
            response = await client.get(url, headers=self.target.headers)
            response.raise_for_status()
            return promscrape.parse_metrics(response.text), None
        except (httpx.HTTPError, ValueError) as exc:
            return None, f"could not read {url}: {type(exc).__name__}: {exc}"


async def run_steps(gen: LoadGenerator, phases: list[Phase], warmup: float, slo: float | None) -> list[dict]:
    """Warm up once, then run each phase measured, with a /metrics scrape before and after it."""
    results = []
    async with gen.client() as client:
        if warmup > 0 and phases:
            first = phases[0]
            await gen.run_phase(client, Phase(warmup, first.rate, first.concurrency, first.arrivals), None)
        for phase in phases:
            await asyncio.sleep(SETTLE_S)
            before, error = await gen.scrape(client)
            rec = Recorder(gen.mix.labels, slo)
            seconds = await gen.run_phase(client, phase, rec)
            await asyncio.sleep(SETTLE_S)
            after, error_after = await gen.scrape(client)
            step = {
                "mode": phase.mode,
                "target_rate": phase.rate,
                "concurrency": phase.concurrency,
                "arrivals": phase.arrivals if phase.mode == "open" else None,
                **rec.to_dict(seconds),
                "server": None,
                "cross_check": None,
                "metrics_error": error or error_after,
            }
            if before is not None and after is not None:
                server = promscrape.summarize(promscrape.diff(before, after), seconds, gen.target.model)
                step["server"] = server
                step["cross_check"] = promscrape.cross_check(
                    {k: s.codes() for k, s in rec.per_rate.items()},
                    {k: s.tokens for k, s in rec.per_rate.items()},
                    server,
                )
            results.append(step)
    return results
