"""`evit-loadtest`: drive an evit-serve instance and report latency per keep rate.

evit-loadtest --url http://127.0.0.1:8000 --rate 20 --duration 30 --keep-rates 0.5:1,0.7:2,1.0:1 --output runs/lt
evit-loadtest report runs/lt-a runs/lt-b --output runs/lt-merged   (re-read and merge saved histograms)
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

from service.loadtest import report
from service.loadtest.runner import LoadGenerator, Phase, Target, run_steps
from service.loadtest.workload import KeepRateMix, generate_images, load_images


def _positive(kind: type) -> object:
    def parse(text: str) -> float | int:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _number_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"need numbers > 0: {text!r}")
    return sorted(values)


def _pairs(items: list[str], sep: str, what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, found, value = item.partition(sep)
        if not found or not key.strip():
            raise ValueError(f"{what} {item!r} is not KEY{sep}VALUE")
        out[key.strip()] = value.strip()
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evit-loadtest", description=__doc__.split("\n\n")[0],
                                epilog="evit-loadtest report RUN [RUN ...]: merge and re-read saved runs",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=_positive(float), help="open loop: target requests/s")
    load.add_argument("--concurrency", type=_positive(int), help="closed loop: N clients, one request each")
    load.add_argument("--sweep", type=_number_list, help="a list of rates (or clients, see --sweep-mode)")
    p.add_argument("--sweep-mode", choices=("rate", "concurrency"), default="rate")
    p.add_argument("--arrivals", choices=("poisson", "constant"), default="poisson", help="open loop arrivals")
    p.add_argument("--duration", type=_positive(float), default=30.0, help="seconds per measured step")
    p.add_argument("--max-requests", type=_positive(int), help="at most this many requests per step")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unrecorded load before measuring")
    p.add_argument("--keep-rates", default="1.0", help="mix RATE[:WEIGHT],...; RATE in (0,1], auto, default")
    p.add_argument("--images", type=Path, help="folder of images to send (default: generated JPEGs)")
    p.add_argument("--generated", type=_positive(int), default=8, help="how many images to generate")
    p.add_argument("--image-size", type=_positive(int), default=224, help="side of generated images")
    p.add_argument("--model", help="model name to request (default: the server's)")
    p.add_argument("--endpoint", default="/classify")
    p.add_argument("--param", action="append", default=[], help="extra query parameter KEY=VALUE")
    p.add_argument("--header", action="append", default=[], help="extra header 'Name: value'")
    p.add_argument("--timeout", type=_positive(float), default=30.0, help="client timeout per request (s)")
    p.add_argument("--max-inflight", type=_positive(int), default=512, help="cap on open requests")
    p.add_argument("--slo-ms", type=_positive(float), help="count answers within this latency (goodput)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=Path("runs/loadtest"), help="folder for the results")
    p.add_argument("--out", dest="output", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table")
    return p


def check_target(url: str, allow_remote: bool) -> None:
    """Refuse anything but http(s) to a loopback address unless ``allow_remote``; sends nothing."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--url must be http(s)://HOST[:PORT], got {url!r}")
    if allow_remote:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 80, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {parts.hostname!r}: {exc}") from None
    remote = sorted({i[4][0] for i in infos if not ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback})
    if remote:
        raise ValueError(
            f"{parts.hostname} resolves to non-loopback {', '.join(remote)}; pass --allow-remote to target it"
        )


def build_phases(args: argparse.Namespace) -> list[Phase]:
    common = {"duration": args.duration, "arrivals": args.arrivals, "max_requests": args.max_requests}
    if args.rate is not None:
        return [Phase(rate=args.rate, **common)]
    if args.concurrency is not None:
        return [Phase(concurrency=args.concurrency, **common)]
    if args.sweep_mode == "rate":
        return [Phase(rate=v, **common) for v in args.sweep]
    return [Phase(concurrency=int(v), **common) for v in args.sweep]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        from service.loadtest import merge

        return merge.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_target(args.url, args.allow_remote)
        mix = KeepRateMix.parse(args.keep_rates)
        target = Target(
            url=args.url,
            endpoint=args.endpoint,
            model=args.model,
            params=_pairs(args.param, "=", "--param"),
            headers=_pairs(args.header, ":", "--header"),
            timeout=args.timeout,
        )
        images = load_images(args.images) if args.images else generate_images(args.generated, args.image_size)
    except ValueError as exc:
        parser.error(str(exc))
    phases = build_phases(args)
    if any(p.concurrency and p.concurrency > args.max_inflight for p in phases):
        parser.error("--concurrency must not exceed --max-inflight")

    from tqdm import tqdm

    bar = tqdm(unit="req", desc="answers", disable=True if args.quiet else None, file=sys.stderr)
    gen = LoadGenerator(
        target, mix, images, seed=args.seed, max_inflight=args.max_inflight, on_answer=lambda: bar.update(1)
    )
    try:
        steps = asyncio.run(run_steps(gen, phases, args.warmup, args.slo_ms / 1e3 if args.slo_ms else None))
    finally:
        bar.close()

    paths, results = write_outputs(args, mix, images, steps)
    if not args.quiet:
        print(report.format_table(results))
        print("wrote " + ", ".join(str(p) for p in paths))
    if sum(s["sent"] for s in steps) and not sum(s["ok"] for s in steps):
        print("evit-loadtest: no request succeeded (see errors above)", file=sys.stderr)
        return 1
    return 0


def write_outputs(args: argparse.Namespace, mix: KeepRateMix, images: list, steps: list[dict]) -> tuple[list, dict]:
    """results.json, results.csv, timeseries.csv, histograms.json and latency.png in --output."""
    config = {
        "keep_rates": mix.fractions(),
        "images": str(args.images) if args.images else None,
        "generated_images": None if args.images else len(images),
        "warmup": args.warmup,
        "duration": args.duration,
        "max_requests": args.max_requests,
        "model": args.model,
        "slo_ms": args.slo_ms,
        "seed": args.seed,
    }
    histograms = report.split_state(steps, args.slo_ms / 1e3 if args.slo_ms else None)
    results = {"tool": "evit-loadtest", "url": args.url, "latency_unit": "milliseconds", "config": config,
               **steps[-1], "steps": steps}
    return report.write_all(results, {"url": args.url, **config}, histograms, args.output), results


if __name__ == "__main__":
    raise SystemExit(main())
