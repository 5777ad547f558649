"""Service settings: environment variables (``EVIT_`` prefix) overridden by command-line flags.

Models can be given two ways. The flat flags (``--model``, ``--checkpoint``, ``--random-weights``,
``--prune-blocks``, ``--keep-rate``, ``--options``) cover the common cases; ``EVIT_MODELS`` (a JSON list of
:class:`ModelSpec`) covers everything else, e.g. extra timm arguments for a model, and wins when set.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_ARCH = "deit_small_patch16_224"
ASSET_CHECKPOINT = "../shared/assets/weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"


class ModelSpec(BaseModel):
    """One hosted model. ``weights``: ``hub`` (timm's pretrained), ``random``, or a checkpoint path."""

    name: str = ""  # the name requests use; defaults to ``arch``
    arch: str = DEFAULT_ARCH  # a timm architecture
    weights: str = "hub"
    prune_blocks: tuple[int, ...] | None = None  # 0-based; None: the paper's 1/4, 2/4, 3/4 of the depth
    fuse: bool = True
    # training-free options: the paper's rule, or evit.ACCURATE (docs/accuracy.md); model_kwargs set any one
    options: Literal["paper", "accurate"] = "paper"
    keep_rate: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)  # default for requests without one
    model_kwargs: dict[str, Any] = Field(default_factory=dict)  # extra timm.create_model arguments
    labels: list[str] | None = None  # class names; default: ImageNet-1k names for 1000-class models

    @model_validator(mode="after")
    def _default_name(self) -> ModelSpec:
        if not self.name:
            self.name = self.arch
        return self

    @property
    def random_weights(self) -> bool:
        return self.weights == "random"


_URL_PATH = re.compile(r"^/[A-Za-z0-9._~/-]*$")


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EVIT_", extra="ignore")

    # models (flat form; see the module docstring)
    model: Annotated[list[str], NoDecode] = [DEFAULT_ARCH]  # ARCH or NAME=ARCH; EVIT_MODEL=a,b
    checkpoint: Annotated[list[Path], NoDecode] = []  # one per model, in order
    random_weights: bool = False
    prune_blocks: Annotated[tuple[int, ...] | None, NoDecode] = None  # EVIT_PRUNE_BLOCKS=3,6,9
    keep_rate: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    options: Literal["paper", "accurate"] = "paper"  # EVIT_OPTIONS=accurate: evit.ACCURATE
    models: list[ModelSpec] | None = None  # full form: EVIT_MODELS='[{"arch": ..., "weights": ...}]'
    seed: int = 0  # seeds random weights so replicas agree

    # runtime
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    half: bool = True  # float16 on CUDA (CPU always runs float32)
    torch_threads: int | None = Field(None, ge=1)
    decode_threads: int | None = Field(None, ge=1)  # None: min(4, CPU cores)

    # batching
    max_batch_size: int = Field(16, ge=1, le=1024)
    max_wait_ms: float = Field(5.0, ge=0.0, allow_inf_nan=False)
    queue_size: int = Field(256, ge=1)  # per model: requests admitted but not yet in a batch
    batch_policy: Literal["auto", "mixed", "grouped"] = "auto"
    request_timeout_s: float = Field(30.0, gt=0.0, allow_inf_nan=False)
    drain_timeout_s: float = Field(60.0, ge=0.0, allow_inf_nan=False)
    warmup: bool = True

    # latency-aware scheduling (see service/scheduler.py): keep_rate=auto, deadlines, priorities
    latency_target_ms: float = Field(500.0, gt=0.0, allow_inf_nan=False)  # auto without a deadline aims here
    auto_min_keep_rate: float = Field(0.5, gt=0.0, le=1.0, allow_inf_nan=False)  # auto's floor by default
    auto_keep_rate_step: float = Field(0.05, gt=0.0, le=1.0, allow_inf_nan=False)  # auto's grid of rates
    low_priority_queue_share: float = Field(0.5, gt=0.0, le=1.0)  # low-priority requests get this part of the queue
    latency_safety_z: float = Field(2.0, ge=0.0, le=10.0)  # margin: predictions x (1 + z * relative error)
    load_window_s: float = Field(2.0, gt=0.0, allow_inf_nan=False)  # auto keeps up with arrivals over this window

    # input limits
    max_body_bytes: int = Field(20 * 2**20, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)  # checked from the image header, before decoding
    image_formats: Annotated[tuple[str, ...], NoDecode] = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
    jpeg_draft: bool = True  # let libjpeg downscale large JPEGs while decoding (never below the resize)
    max_top_k: int = Field(100, ge=1)

    # security (see service/auth.py): with tokens, every route but health, metrics and docs needs one
    api_tokens: Annotated[list[SecretStr], NoDecode] = []  # EVIT_API_TOKENS=a,b (env or file, never a flag)
    api_tokens_file: Path | None = None  # one token per line, '#' comments
    metrics_path: str = "/metrics"  # "" turns /metrics off
    docs_path: str = "/docs"  # "" turns /docs, /redoc and /openapi.json off
    body_timeout_s: float = Field(15.0, gt=0.0, allow_inf_nan=False)  # slower bodies get 408

    # server
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"
    log_json: bool = True

    @field_validator("model", "checkpoint", "api_tokens", "image_formats", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return _split_commas(v)

    @field_validator("prune_blocks", mode="before")
    @classmethod
    def _blocks(cls, v: Any) -> Any:
        return None if v in ("", None) else _split_commas(v)

    @field_validator("metrics_path", "docs_path")
    @classmethod
    def _path(cls, v: str) -> str:
        if v and not _URL_PATH.match(v):
            raise ValueError(f"must be empty (off) or a URL path like /internal/metrics, got {v!r}")
        return v.rstrip("/") if len(v) > 1 else v

    @model_validator(mode="after")
    def _load_tokens(self) -> Settings:
        from service.auth import check_tokens, read_token_file

        tokens = [t.get_secret_value() for t in self.api_tokens]
        if self.api_tokens_file is not None:
            tokens += read_token_file(self.api_tokens_file)
        self.api_tokens = [SecretStr(t) for t in check_tokens(tokens)]
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")

    @model_validator(mode="after")
    def _checkpoints_match(self) -> Settings:
        if self.models is None and self.checkpoint and len(self.checkpoint) != len(self.model):
            raise ValueError(
                f"give one --checkpoint per --model, in the same order ({len(self.model)} models, "
                f"{len(self.checkpoint)} checkpoints), or describe the models in EVIT_MODELS"
            )
        names = [s.name for s in self.model_specs()]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        return self

    def model_specs(self) -> list[ModelSpec]:
        """The hosted models: ``models`` when given, else built from the flat flags."""
        if self.models is not None:
            return list(self.models)
        specs = []
        for i, entry in enumerate(self.model):
            name, _, arch = entry.rpartition("=")
            fallback = "random" if self.random_weights else "hub"
            weights = str(self.checkpoint[i]) if self.checkpoint else fallback
            specs.append(
                ModelSpec(
                    name=name or arch,
                    arch=arch,
                    weights=weights,
                    prune_blocks=self.prune_blocks,
                    keep_rate=self.keep_rate,
                    options=self.options,
                )
            )
        return specs

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evit-serve",
        description="Serve EViT (token-pruned ViT) classifiers over HTTP. Every flag also reads an "
        "environment variable: EVIT_ and the flag name in capitals (--max-batch-size: EVIT_MAX_BATCH_SIZE).",
    )
    add = p.add_argument
    add("--model", action="append", metavar="[NAME=]ARCH",
        help=f"timm architecture to host (repeatable); NAME is the name requests use (default {DEFAULT_ARCH})")
    add("--checkpoint", action="append", type=Path, metavar="PATH",
        help="local weights for the --model at the same position (.pth/.pt/.safetensors), e.g. "
        f"--model vit_tiny_patch16_224 --checkpoint {ASSET_CHECKPOINT}")
    add("--random-weights", action="store_true", default=None,
        help="random weights instead of the hub's (predictions are meaningless; flagged in /models)")
    add("--prune-blocks", metavar="I,J,K", help="0-based blocks that prune (default: 1/4, 2/4, 3/4 of the depth)")
    add("--keep-rate", type=float, help="default keep rate for requests that give none (default 1.0)")
    add("--options", choices=["paper", "accurate"],
        help="paper: EViT's rule (default); accurate: evit.ACCURATE, more top-1 at each keep rate's GMACs")
    add("--device", help="auto | cpu | cuda | cuda:N")
    add("--host")
    add("--port", type=int)
    add("--max-batch-size", type=int)
    add("--max-wait-ms", type=float, help="longest the oldest queued request waits for a fuller batch")
    add("--queue-size", type=int, help="requests per model admitted but not yet batched; more get 503")
    add("--request-timeout-s", type=float, help="requests not answered by then get 504 (and are not run)")
    add("--batch-policy", choices=["auto", "mixed", "grouped"],
        help="auto: the cost model chooses per batch between one mixed-rate batch and groups by keep rate")
    add("--latency-target-ms", type=float, help="keep_rate=auto without a deadline: the latency it aims for")
    add("--auto-min-keep-rate", type=float, help="keep_rate=auto: the lowest rate chosen unless min_keep_rate says")
    add("--torch-threads", type=int)
    add("--decode-threads", type=int)
    add("--max-body-bytes", type=int)
    add("--max-image-pixels", type=int)
    add("--drain-timeout-s", type=float)
    add("--body-timeout-s", type=float, help="requests whose body has not arrived by then get 408 (slow uploads)")
    add("--api-tokens-file", type=Path, metavar="PATH",
        help="bearer tokens (one a line) required on every route but health, metrics and docs; "
        "or EVIT_API_TOKENS=a,b")
    add("--metrics-path", help="where /metrics is served; '' turns it off")
    add("--docs-path", help="where /docs is served; '' turns off /docs, /redoc and /openapi.json")
    add("--log-level")
    add("--no-warmup", dest="warmup", action="store_false", default=None)
    return p


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Settings from the environment, with the flags given in ``argv`` taking precedence."""
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    if "prune_blocks" in overrides:
        overrides["prune_blocks"] = _split_commas(overrides["prune_blocks"])
    if {"model", "checkpoint", "random_weights", "prune_blocks", "keep_rate", "options"} & overrides.keys():
        overrides["models"] = None  # flat model flags replace EVIT_MODELS
    return Settings(**overrides)
