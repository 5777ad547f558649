"""``python -m benchmarks.loadclient``: the load tester's own CPU per request, aiohttp (evit-loadtest) vs httpx.

A trivial HTTP server (a raw asyncio protocol answering every POST with a fixed JSON body, in its own process)
listens on 127.0.0.1, so nearly all the work measured is the client's. evit-loadtest's generator sends N
requests closed-loop with C clients, its recorder counting every answer, once with its aiohttp client and once
with the httpx client it used before (the same generator, recorder, image and query, only the HTTP client
swapped). CPU is this process's ``time.process_time()`` over the run, divided by the requests answered. The
two alternate, round after round, and each reports its median round, so a busy spell on the shared CPU lands
on both. Goal: <= 0.3 ms of client CPU per request for evit-loadtest. Not a test.

    python -m benchmarks.loadclient [--requests 2000] [--concurrency 8] [--rounds 3] [--out runs/loadclient.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.loadtest.runner import LoadGenerator, Phase, Target
from service.loadtest.stats import Recorder
from service.loadtest.workload import DEFAULT_RATE, Image, KeepRateMix, generate_images

BODY = b'{"model":"fake","keep_rate":0.7,"tokens":1652,"predictions":[]}'
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)


class _Trivial(asyncio.Protocol):
    """HTTP/1.1 keep-alive: one fixed answer per request (headers, then content-length bytes of body)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport, self.buf = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            self.transport.write(RESPONSE)


def serve() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)

    async def run() -> None:
        server = await asyncio.get_running_loop().create_server(_Trivial, sock=sock)
        await server.serve_forever()

    asyncio.run(run())


class HttpxGenerator(LoadGenerator):
    """evit-loadtest's generator with the httpx client it had before (the request path of that version)."""

    def client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self._max_inflight, max_keepalive_connections=self._max_inflight)
        return httpx.AsyncClient(limits=limits, timeout=self.target.timeout, trust_env=False)

    async def _post(self, client: httpx.AsyncClient, label: str, image: Image) -> tuple[str, object]:
        params = dict(self.target.params)
        if label != DEFAULT_RATE:
            params["keep_rate"] = label
        headers = {"content-type": image.content_type, **self.target.headers}
        try:
            response = await client.post(self._url, params=params, content=image.data, headers=headers)
        except httpx.TimeoutException:
            return "timeout", None
        except httpx.TransportError:
            return "connection_error", None
        body = response.json() if response.is_success else None
        return str(response.status_code), body


async def measure(kind: type[LoadGenerator], url: str, image: Image, requests: int, concurrency: int) -> dict:
    mix = KeepRateMix.parse("0.7")
    gen = kind(Target(url=url), mix, [image], max_inflight=concurrency)
    async with gen.client() as client:  # a short warm-up opens the connections
        await gen.run_phase(client, Phase(60, concurrency=concurrency, max_requests=4 * concurrency), None)
        rec = Recorder(mix.labels, start=time.perf_counter())
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await gen.run_phase(client, Phase(600, concurrency=concurrency, max_requests=requests), rec)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    ok = rec.per_rate["0.7"].ok
    if ok != requests:
        raise RuntimeError(f"{kind.__name__}: {ok} of {requests} answered ok ({dict(rec.per_rate['0.7'].errors)})")
    return {"cpu_ms_per_request": 1e3 * cpu / ok, "requests_per_second": ok / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadclient", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="requests per client per round")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--image-size", type=int, default=224, help="side of the generated JPEG sent")
    p.add_argument("--out", type=Path, default=Path("runs/loadclient.json"))
    args = p.parse_args(argv)
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.loadclient", "--serve"], stdout=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{int(server.stdout.readline())}"
        image = generate_images(1, args.image_size)[0]
        kinds = {"aiohttp (evit-loadtest)": LoadGenerator, "httpx (before)": HttpxGenerator}
        rounds: dict[str, list[dict]] = {name: [] for name in kinds}
        for _ in range(args.rounds):
            for name, kind in kinds.items():
                rounds[name].append(asyncio.run(measure(kind, url, image, args.requests, args.concurrency)))
    finally:
        server.terminate()
        server.wait(timeout=10)
    results = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in rounds.items()}
    ratio = results["httpx (before)"]["cpu_ms_per_request"] / results["aiohttp (evit-loadtest)"]["cpu_ms_per_request"]
    for name, r in results.items():
        print(f"{name:24s} {r['cpu_ms_per_request']:.3f} ms CPU/request, {r['requests_per_second']:.0f} req/s")
    print(f"httpx / aiohttp CPU per request: {ratio:.1f}x (image {len(image.data)} bytes, C={args.concurrency})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": vars(args) | {"out": str(args.out)}, "median": results,
                                    "rounds": rounds, "httpx_over_aiohttp": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        raise SystemExit(main())
