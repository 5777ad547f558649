"""The hostile image corpus through the HTTP API: each image gets its exact answer and the service keeps serving."""

from __future__ import annotations

import pytest
from _hostile import JPEG, corpus, encode, noise, png_declaring
from _reliability import LEAK, Tally, record

pytestmark = pytest.mark.anyio


def check_error_body(r, status: int, error: str | None) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    if status == 200:
        body = r.json()
        assert len(body["predictions"]) == 5 and body["tokens"] > 0
        return
    body = r.json()  # every refusal is the service's JSON error schema
    assert body["status"] == status and body["error"] == error and body["message"] and body["request_id"]
    assert r.headers["x-request-id"] == body["request_id"]
    assert not LEAK.search(r.text), r.text


async def test_hostile_corpus(serve, tiny_settings) -> None:
    specimens = corpus()
    async with serve(tiny_settings()) as (app, client):
        tally = Tally(client, ("/classify",))
        for s in specimens:  # as the raw body, with its declared content type
            r = await client.post("/classify", content=s.data, headers={"content-type": s.content_type})
            check_error_body(r, s.status, s.error)
        # the same images as multipart uploads (a part's declared type is not checked: the bytes decide)
        image_specimens = [s for s in specimens if s.data and s.error != "unsupported_media_type"]
        for s in image_specimens:
            r = await client.post("/classify", files={"file": ("x", s.data, s.content_type)})
            check_error_body(r, s.status, s.error)
        framing = [  # broken multipart framing and missing parts
            (b"--nope\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc", "multipart/form-data; boundary=x",
             400, "bad_multipart"),
            (b"abc", "multipart/form-data", 400, "bad_multipart"),  # no boundary
            (b"", "multipart/form-data; boundary=x", 422, "missing_file"),
            (b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nabc",  # unterminated
             "multipart/form-data; boundary=x", 422, "missing_file"),
            (b"--x\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nabc\r\n--x--\r\n",
             "multipart/form-data; boundary=x", 422, "missing_file"),
        ]
        for data, kind, status, error in framing:
            r = await client.post("/classify", content=data, headers={"content-type": kind})
            check_error_body(r, status, error)
        # still serving, and the pixel limit was decided from headers: nothing over it was ever decoded
        ok = await client.post("/classify", content=encode(noise(), "JPEG"), headers={"content-type": JPEG})
        assert ok.status_code == 200 and (await client.get("/healthz")).status_code == 200
        bomb = await client.post("/classify", content=png_declaring(50_000, 50_000))
        assert bomb.status_code == 413 and "2500000000 pixels" in bomb.json()["message"]
        text = app.state.service.metrics.render().decode()
        assert 'code="500"' not in text
    record("hostile_corpus", {
        "what": f"{len(specimens)} hostile images as raw bodies and {len(image_specimens)} as multipart uploads "
                f"(truncated/corrupt JPEG and PNG, empty, 1x1, bombs up to 10^12 declared pixels, 16-bit, float, "
                f"CMYK, palette, alpha, animated GIF/PNG/WebP, EXIF orientation 0..65535 and garbage EXIF, wrong "
                f"content types, JPEG+ZIP and HTML-comment polyglots) plus {len(framing)} broken multipart bodies",
        "sent": tally.sent, "answered": tally.answered, "accepted": tally.codes[200],
        "rejected": sum(n for c, n in tally.codes.items() if 400 <= c < 500),
        "crashes": sum(n for c, n in tally.codes.items() if c >= 500), "memory_growth_mb": None,
        "notes": f"each answer is the expected status and error type; by status: {tally.by_status()}",
    })
