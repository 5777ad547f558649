"""``python -m benchmarks.litserve_peer``: the LitServe peer of ``benchmarks.service``.

What a LitServe user would write to serve this library's EViT model: a ``LitAPI`` that builds the same eager
float32 model (``evit.create_model`` at a fixed keep rate, same weights), decodes the multipart field ``file``
with PIL and timm's eval transform, and batches requests (``max_batch_size``, ``batch_timeout``) into one
forward pass. ``POST /predict`` answers the top-5 classes and probabilities; ``GET /health`` is 200 once the
worker is up. Not part of the service.
"""

import argparse
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from fastapi import Request
from PIL import Image
from timm.data import create_transform

import evit


class EViTLitAPI(ls.LitAPI):
    """The eager EViT model at one keep rate, batched by LitServe."""

    def __init__(self, arch: str, checkpoint: Path | None, keep_rate: float, top_k: int = 5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.arch, self.checkpoint, self.keep_rate, self.top_k = arch, checkpoint, keep_rate, top_k

    def setup(self, device: str) -> None:
        weights = {"checkpoint_path": str(self.checkpoint)} if self.checkpoint else {}
        self.model = evit.create_model(self.arch, keep_rate=self.keep_rate, **weights).eval().to(device)
        self.transform = create_transform(**evit.data_config(self.model), is_training=False)
        self.device = device

    def decode_request(self, request: Request) -> torch.Tensor:
        """A multipart form's ``file`` (an UploadFile) -> a normalised 3, H, W tensor.

        Annotated ``Request`` (not postponed: LitServe reads the annotation) so LitServe passes the parsed form."""
        with Image.open(request["file"].file) as img:
            return self.transform(img.convert("RGB"))

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(x.to(self.device), keep_rate=self.keep_rate).softmax(dim=-1)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, output: torch.Tensor) -> dict[str, Any]:
        top = output.topk(self.top_k)
        return {"keep_rate": self.keep_rate, "classes": top.indices.tolist(), "probabilities": top.values.tolist()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.litserve_peer", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--checkpoint", type=Path, help="weights (random when absent)")
    p.add_argument("--keep-rate", type=float, default=0.7)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-timeout-ms", type=float, default=5.0, help="like the service's --max-wait-ms")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--fast-queue", action="store_true", help="LitServe's ZeroMQ queues instead of its default")
    args = p.parse_args(argv)
    api = EViTLitAPI(args.model, args.checkpoint, args.keep_rate, max_batch_size=args.max_batch_size,
                     batch_timeout=args.batch_timeout_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, fast_queue=args.fast_queue)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
