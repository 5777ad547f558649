"""Locust load test for evit-serve with the same keep-rate mix as evit-loadtest.

    pip install locust
    locust -f locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 8 -t 60s \\
        --keep-rates 0.5:1,0.7:2,1.0:1 [--images DIR] [--evit-model NAME] [--pacing 0.5]

Each request is reported under the name ``/classify keep_rate=<rate>``, so Locust's statistics
(percentiles, failures by status) come out per keep rate. Users run back to back (closed loop) unless
``--pacing S`` starts each user's requests every S seconds (Locust's constant_pacing). Targets loopback
only unless ``--allow-remote``. Locust measures from the actual send: for open-loop latency free of
coordinated omission use evit-loadtest. Users are Locust's ``FastHttpUser`` (geventhttpclient), whose client
costs several times less CPU per request than the requests-based ``HttpUser``.
"""

from __future__ import annotations

import functools
import random
import time
from pathlib import Path
from urllib.parse import urlencode

from locust import FastHttpUser, events, task
from locust.exception import StopUser

from service.loadtest.cli import check_target
from service.loadtest.workload import DEFAULT_RATE, KeepRateMix, generate_images, load_images


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--keep-rates", default="1.0", env_var="EVIT_KEEP_RATES", help="RATE[:WEIGHT],...")
    parser.add_argument("--images", default="", env_var="EVIT_IMAGES", help="folder of images (default: generated)")
    parser.add_argument("--evit-model", default="", env_var="EVIT_MODEL", help="model name to request")
    parser.add_argument("--pacing", type=float, default=0.0, help="seconds between a user's request starts")
    parser.add_argument("--allow-remote", action="store_true", default=False, help="allow a non-loopback host")


@events.init.add_listener
def _check(environment, **_kwargs) -> None:
    """Refuse a non-loopback host before anything is sent (each user checks again on start)."""
    options = environment.parsed_options
    if options is not None and environment.host:
        try:
            check_target(environment.host, options.allow_remote)
        except ValueError as exc:
            raise SystemExit(f"locustfile: {exc}") from None


@functools.cache
def _images(folder: str) -> list:
    """The images to send, read (or generated) once per process and shared by its users."""
    return load_images(Path(folder)) if folder else generate_images(8)


class EvitUser(FastHttpUser):
    def wait_time(self) -> float:
        pacing = self.environment.parsed_options.pacing if self.environment.parsed_options else 0.0
        if pacing <= 0:
            return 0.0
        return max(0.0, pacing - (time.monotonic() - self._task_started))

    def on_start(self) -> None:
        options = self.environment.parsed_options
        try:
            check_target(self.host or "", bool(options and options.allow_remote))
            self.mix = KeepRateMix.parse(options.keep_rates if options else "1.0")
            folder = options.images if options else ""
            self.images = _images(folder)
        except ValueError as exc:
            raise StopUser(str(exc)) from exc
        self.model = options.evit_model if options else ""
        self.labels = self.mix.chooser(random.Random())
        self._task_started = time.monotonic()

    @task
    def classify(self) -> None:
        self._task_started = time.monotonic()
        label = next(self.labels)
        image = random.choice(self.images)
        params = {} if label == DEFAULT_RATE else {"keep_rate": label}
        if self.model:
            params["model"] = self.model
        query = f"?{urlencode(params)}" if params else ""
        with self.client.post(
            f"/classify{query}",
            data=image.data,
            headers={"content-type": image.content_type},
            name=f"/classify keep_rate={label}",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
