"""The load generator: open-loop (scheduled arrivals) and closed-loop (N clients) phases over HTTP.

Open loop: request ``i`` has a scheduled send time fixed before the run (Poisson or constant
arrivals) and its latency is measured from that time, not from when it actually left. A server that
stalls therefore shows its queueing in the latencies instead of silently slowing the load down (no
coordinated omission). How late the generator itself sent is reported separately (``client_send_lag``).

Requests go out on aiohttp, whose client costs a fraction of httpx's CPU per request
(benchmarks/loadclient.py measures both), so the generator does not take the CPU of the server it measures.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

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
        self._urls: dict[str, URL] = {}

    def client(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self._max_inflight, limit_per_host=self._max_inflight)
        timeout = aiohttp.ClientTimeout(total=self.target.timeout)
        # trust_env=False: never route loopback load through a proxy named in the environment.
        return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False)

    def _url_for(self, label: str) -> URL:
        """The request URL of a keep-rate label, built once per label (query encoding costs CPU)."""
        url = self._urls.get(label)
        if url is None:
            params = dict(self.target.params)
            if label != DEFAULT_RATE:
                params["keep_rate"] = label
            if self.target.model:
                params["model"] = self.target.model
            url = self._urls[label] = URL(self._url).with_query(params)
        return url

    async def _post(self, client: aiohttp.ClientSession, label: str, image: Image) -> tuple[str, object]:
        headers = {"content-type": image.content_type, **self.target.headers}
        try:
            async with client.post(self._url_for(label), data=image.data, headers=headers) as response:
                raw = await response.read()
                status, json_body = response.status, response.content_type == "application/json"
        except TimeoutError:
            return "timeout", None
        except aiohttp.ClientError:
            return "connection_error", None
        body = None
        if 200 <= status < 300 and json_body:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        return str(status), body

    async def _send(
        self, client: aiohttp.ClientSession, label: str, image: Image, scheduled: float, rec: Recorder | None
    ) -> None:
        async with self._inflight:
            sent_at = time.perf_counter()
            status, body = await self._post(client, label, image)
        done = time.perf_counter()
        if rec is not None:
            rec.on_answer(label, status, done - scheduled, sent_at - scheduled, body, done)
        self._on_answer()

    async def run_phase(self, client: aiohttp.ClientSession, phase: Phase, rec: Recorder | None) -> float:
        """Run ``phase`` (``rec=None``: a warm-up, not recorded); returns its seconds, drain included."""
        if phase.rate is not None:
            return await self._open(client, phase, rec)
        return await self._closed(client, phase, rec)

    async def _open(self, client: aiohttp.ClientSession, phase: Phase, rec: Recorder | None) -> float:
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

    async def _closed(self, client: aiohttp.ClientSession, phase: Phase, rec: Recorder | None) -> float:
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

    async def scrape(self, client: aiohttp.ClientSession) -> tuple[promscrape.Snapshot | None, str | None]:
        """The server's metrics now, or (None, why) when they cannot be read."""
        url = self.target.url.rstrip("/") + "/metrics"
        try:
            async with client.get(url, headers=self.target.headers, raise_for_status=True) as response:
                text = await response.text()
            return promscrape.parse_metrics(text), None
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
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
            rec = Recorder(gen.mix.labels, slo, start=time.perf_counter())
            seconds = await gen.run_phase(client, phase, rec)
            await asyncio.sleep(SETTLE_S)
            after, error_after = await gen.scrape(client)
            step = {
                "mode": phase.mode,
                "target_rate": phase.rate,
                "concurrency": phase.concurrency,
                "arrivals": phase.arrivals if phase.mode == "open" else None,
                **rec.to_dict(seconds),
                "state": rec.to_state(),
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
