"""``evit-serve``'s command line, generated from :class:`service.settings.Settings`: one flag per field.

``--max-batch-size`` sets ``max_batch_size`` (also ``EVIT_MAX_BATCH_SIZE``); booleans get ``--x`` / ``--no-x``;
``--model`` and ``--checkpoint`` repeat; other lists take commas; ``--models`` takes the JSON of EVIT_MODELS.
Secrets (``api_tokens``) are never flags: they would show in ``ps``. ``--help`` shows each default and variable.
A flag given wins over its environment variable; an absent flag leaves the environment (or default) in place.
"""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import SecretStr
from pydantic.fields import FieldInfo

from service.settings import ASSET_CHECKPOINT, Settings, _split_commas

REPEATED = {"model", "checkpoint"}  # one per hosted model, in order
FLAT_MODEL = {"model", "checkpoint", "random_weights", "prune_blocks", "keep_rate", "options"}
HELP = {
    "model": "timm architecture to host, [NAME=]ARCH (repeatable); NAME is the name requests use",
    "checkpoint": "local weights for the --model at the same position (.pth/.pt/.safetensors), e.g. "
    f"--model vit_tiny_patch16_224 --checkpoint {ASSET_CHECKPOINT}",
    "random_weights": "random weights instead of the hub's (predictions are meaningless; flagged in /models)",
    "prune_blocks": "0-based blocks that prune, I,J,K (none: 1/4, 2/4, 3/4 of the depth)",
    "keep_rate": "default keep rate for requests that give none",
    "options": "paper: EViT's rule; accurate: evit.ACCURATE, more top-1 at each keep rate's GMACs",
    "models": "JSON list of model specs (name, arch, weights, prune_blocks, options, keep_rate, model_kwargs, "
    "labels); replaces the flat model flags",
    "seed": "seeds random weights so replicas agree",
    "device": "auto | cpu | cuda | cuda:N",
    "backend": "torch: eager, any keep rate; onnxruntime / openvino: compiled graphs per keep-rate bucket; "
    "auto: openvino on a CPU where installed, else torch (what make serve uses)",
    "precision": "auto: fp16 on CUDA, bf16 on a CPU with native bf16, else fp32 (none: fp32 on CPU, fp16 on CUDA)",
    "keep_rates": "compiled backends: the keep-rate buckets, comma-separated (none: 0.5,0.55,...,1.0)",
    "graph_cache_dir": "compiled backends: where graphs are cached across restarts",
    "cuda_graphs": "torch backend on CUDA: replay CUDA graphs for passes whose samples share a keep rate",
    "half": "float16 on CUDA (CPU always runs float32)",
    "torch_threads": "torch's intra-op threads (none: torch's default)",
    "max_batch_size": "most requests in one forward pass",
    "decode_threads": "image decoding threads (none: min(4, CPU cores))",
    "max_wait_ms": "longest the oldest queued request waits for a fuller batch",
    "queue_size": "requests per model admitted but not yet batched; more get 503",
    "batch_policy": "auto: the cost model chooses per batch between one mixed-rate batch and groups by keep rate",
    "request_timeout_s": "requests not answered by then get 504 (and are not run)",
    "drain_timeout_s": "on SIGTERM, how long admitted requests may take to finish",
    "warmup": "run each model once per batch size before /readyz says ready",
    "latency_target_ms": "keep_rate=auto without a deadline: the latency it aims for",
    "auto_min_keep_rate": "keep_rate=auto: the lowest rate chosen unless min_keep_rate says",
    "auto_keep_rate_step": "keep_rate=auto: the grid of rates it chooses from",
    "low_priority_queue_share": "low-priority requests may use this part of the queue",
    "latency_safety_z": "margin on predictions: x (1 + z * relative error)",
    "load_window_s": "keep_rate=auto keeps up with the arrivals of this window",
    "max_body_bytes": "larger request bodies get 413",
    "max_top_k": "the largest top_k a request may ask for",
    "max_image_pixels": "checked from the image header, before decoding",
    "max_image_aspect_ratio": "longer side / shorter side, from the header; thinner images get 422",
    "max_decoded_bytes": "estimated memory one image may take to decode and resize; more gets 413 before decoding",
    "image_formats": "accepted image formats, comma-separated",
    "jpeg_draft": "let libjpeg downscale large JPEGs while decoding (never below the resize)",
    "jpeg_torchvision": "decode and resize JPEGs that draft would not shrink with torchvision (PIL otherwise)",
    "max_connections": "open connections at most; beyond it one waiting for headers is closed, or 503",
    "header_timeout_s": "requests whose headers have not arrived by then are closed (408)",
    "max_header_bytes": "request line + headers at most; more gets 431",
    "max_headers": "header fields at most; more gets 431",
    "upload_budget_bytes": "request bodies being received at once, in bytes; more get 503",
    "shed_delay_ms": "hold each shed 503 this long (slows clients that resend at once)",
    "api_tokens_file": "bearer tokens (one a line) required on every route but health, metrics and docs; "
    "or EVIT_API_TOKENS=a,b",
    "metrics_path": "where /metrics is served; '' turns it off",
    "metrics_port": "also serve the metrics (alone) on this port, as Triton's 8002 (none: only metrics_path)",
    "docs_path": "where /docs is served; '' turns off /docs, /redoc and /openapi.json",
    "body_timeout_s": "requests whose body has not arrived by then get 408 (slow uploads)",
    "port": "the listening port (environment: EVIT_PORT, else PORT as Cloud Run and Knative set it)",
    "host": "the listening address (0.0.0.0 in a container)",
    "log_level": "debug | info | warning | error",
    "log_json": "JSON log lines (else plain text)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evit-serve", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve EViT (token-pruned ViT) classifiers over HTTP. Every flag also reads an environment "
        "variable: EVIT_ and the flag name in capitals (--max-batch-size: EVIT_MAX_BATCH_SIZE); a flag wins.",
    )
    for name, field in Settings.model_fields.items():
        kwargs = _kwargs(name, field)
        if kwargs is not None:
            p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **kwargs)
    return p


def _kwargs(name: str, field: FieldInfo) -> dict[str, Any] | None:
    """argparse's arguments for one field (None: not a flag)."""
    ann = _strip_optional(field.annotation)
    origin, args = get_origin(ann), get_args(ann)
    if SecretStr in (ann, *args):
        return None
    env = "EVIT_PORT, PORT" if name == "port" else f"EVIT_{name.upper()}"
    text = f"{HELP.get(name, field.description or '')} (default: {_show(field)}; env {env})".lstrip()
    if ann is bool:
        return {"action": argparse.BooleanOptionalAction, "help": text}
    if origin is Literal:
        return {"choices": list(args), "help": text}
    if name in REPEATED:
        return {"action": "append", "type": Path if name == "checkpoint" else str, "help": text,
                "metavar": "[NAME=]ARCH" if name == "model" else "PATH"}
    if origin in (list, tuple):
        if name == "models":
            return {"type": json.loads, "metavar": "JSON", "help": text}
        return {"type": _split_commas, "metavar": "A,B", "help": text}
    return {"type": ann if ann in (int, float, str, Path) else str, "help": text}


def _strip_optional(ann: Any) -> Any:
    if get_origin(ann) in (Union, types.UnionType):
        rest = [a for a in get_args(ann) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return ann


def _show(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "none"
    return repr(value) if value == "" else str(value)


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Settings from the environment, with the flags given in ``argv`` taking precedence."""
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    if FLAT_MODEL & overrides.keys():
        overrides["models"] = None  # flat model flags replace EVIT_MODELS
    return Settings(**overrides)

