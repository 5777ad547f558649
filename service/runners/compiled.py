"""What the compiled runners (``onnxruntime``, ``openvino``) share: one graph per keep-rate bucket, cached on disk.

A compiled graph runs one fixed keep rate (``evit.export``), so a runner holds one per bucket
(``RunnerInfo.keep_rates``): a request's rate snaps to a bucket (``snap``), and a pass that mixes rates runs
each rate's graph on its samples (the batcher already splits such batches by rate). Graphs are exported at
warm-up into ``cache_dir``, keyed by the weights, the options, the rate, the precision, the backend and
torch versions and the library code that traces them, so a restart loads them instead of exporting again.
A request that wants the kept patches (visualization) runs the eager float32 model at the same snapped
rate: the graphs only return logits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import evit
from evit import Cost
from evit.backends import GraphFn, backend_version, import_backend, load_graph
from evit.export import OPSET, export_onnx
from service.runners.base import RunnerOutput, kept_indices, model_info, snap_to

log = logging.getLogger("service.runners")

DEFAULT_BUCKETS = tuple(round(0.5 + 0.05 * i, 2) for i in range(11))  # 0.5, 0.55, ..., 1.0


def code_digest() -> str:
    """sha256 of the library modules a graph is traced from: a changed forward invalidates cached graphs."""
    import evit.blocks
    import evit.export
    import evit.merge
    import evit.patch
    import evit.reorganize

    h = hashlib.sha256()
    for module in (evit.blocks, evit.export, evit.merge, evit.patch, evit.reorganize):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def weights_digest(model: nn.Module) -> str:
    """sha256 of the state dict (names, dtypes, shapes, values): the weights part of a graph's cache key."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class CompiledRunner:
    """An EViT model as exported graphs run by ``backend`` at ``precision`` ("fp32", "bf16", "fp16")."""

    backend = ""  # "onnxruntime" | "openvino", set by the subclass

    def __init__(self, model: nn.Module, device: torch.device, precision: str, cache_dir: str | Path,
                 keep_rates: Sequence[float] | None = None, name: str = "", threads: int | None = None) -> None:
        import_backend(self.backend)  # a missing package fails here, at startup, naming the extra
        self.model = model.float().cpu().eval()  # exported in float32; the backend compiles at ``precision``
        self.device = device
        self.precision = precision
        self.cache_dir = Path(cache_dir).expanduser()
        self.threads = threads
        self._data_config = evit.data_config(model)
        rates = tuple(sorted({round(float(r), 6) for r in (keep_rates or DEFAULT_BUCKETS)}))
        if not rates or not all(0.0 < r <= 1.0 for r in rates):
            raise ValueError(f"keep-rate buckets must be in (0, 1], got {rates}")
        self.info = model_info(model, name, self.backend, precision, device,
                               tuple(self._data_config["input_size"]), rates)
        self._costs: dict[float, Cost] = {}  # per bucket: every pass reads its tokens
        self._graphs: dict[float, GraphFn] = {}
        self._key_base: dict[str, Any] | None = None

    @property
    def data_config(self) -> dict[str, Any]:
        return dict(self._data_config)

    def snap(self, rate: float) -> float:
        return snap_to(self.info.keep_rates, rate)

    def cost(self, rate: float) -> Cost:
        cost = self._costs.get(rate)
        if cost is None:
            cost = self._costs[rate] = self.model.cost(rate)
        return cost

    def cache_key(self, rate: float) -> str:
        """The graph's file name: a hash of everything that changes what the graph computes or how it loads."""
        if self._key_base is None:
            cfg = self.model.evit_cfg
            self._key_base = {
                "weights": weights_digest(self.model), "arch": type(self.model).__name__,
                "options": repr(cfg.__class__(**{**cfg.__dict__, "keep_rate": 1.0})),
                "input": list(self.info.input_size), "precision": self.precision, "device": self.device.type,
                "backend": backend_version(self.backend), "torch": torch.__version__, "opset": OPSET,
                "code": code_digest(),
            }
        text = json.dumps({**self._key_base, "rate": rate}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def graph_path(self, rate: float) -> Path:
        """The cached ONNX graph for ``rate``, exported first if absent (written atomically)."""
        path = self.cache_dir / f"{self.backend}-{self.cache_key(rate)}.onnx"
        if not path.exists():
            log.info("exporting the keep-rate %s graph to %s", rate, path)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            self.export(tmp, rate)
            os.replace(tmp, path)
        return path

    def export(self, path: Path, rate: float) -> None:
        """Write the graph for ``rate`` (float32; a subclass may export in another dtype)."""
        export_onnx(self.model, path, keep_rate=rate)

    def graph(self, rate: float) -> GraphFn:
        fn = self._graphs.get(rate)
        if fn is None:
            if rate not in (self.info.keep_rates or ()):
                raise ValueError(f"keep rate {rate} is not one of the buckets {self.info.keep_rates}")
            fn = self._graphs[rate] = self.compile(self.graph_path(rate))
        return fn

    def compile(self, path: Path) -> GraphFn:
        """The backend's callable for one graph (subclasses add their backend's options)."""
        return load_graph(path, self.backend, self.precision, str(self.device), self.threads, self.cache_dir)

    def warm_up(self) -> None:
        """Export (or load from the cache) and compile every bucket's graph."""
        for rate in self.info.keep_rates or ():
            self.graph(rate)

    def forward(self, images: Sequence[torch.Tensor], rates: Sequence[float], return_kept: bool = False
                ) -> RunnerOutput:
        rates = [self.snap(r) for r in rates]
        if return_kept:  # the graphs give logits only: the eager model at the same rates gives the kept patches
            with torch.inference_mode():
                out = self.model.forward_with_info(torch.stack(list(images)), keep_rate=rates, return_kept=True)
            stages = [s.cpu() for s in out.kept or []]
            return RunnerOutput(out.logits.float(), [int(t) for t in out.tokens.tolist()],
                                kept_indices(stages, len(images)))
        x = torch.stack(list(images)).numpy()  # B, C, H, W float32
        logits = torch.empty(len(images), self.info.num_classes)  # B, classes
        for rate in sorted(set(rates)):  # one pass per rate: its graph on its samples
            idx = [i for i, r in enumerate(rates) if r == rate]
            logits[idx] = torch.from_numpy(self.graph(rate)(x[idx]))
        tokens = {r: self.cost(r).total_tokens for r in set(rates)}
        return RunnerOutput(logits, [tokens[r] for r in rates])
