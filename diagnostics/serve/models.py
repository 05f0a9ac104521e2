"""The model the service scores with, and switching it without a restart.

`ModelHolder` keeps the current `OnnxModel` and its `Scorer`. `refresh()` asks a source
(the CLI passes one that follows `models:/NAME@ALIAS` in the registry) whether another version
is current; if so it loads the new file completely, and only then swaps the reference the
worker reads. A load that fails leaves the old model serving, and says so. Every finding
records the model sha256 and version it came from, so a switch mid-queue is visible.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from diagnostics.serve.config import ServeConfig
from diagnostics.serve.runner import OnnxModel, Scorer

log = logging.getLogger(__name__)

# current version -> None (unchanged) or (new file, new version)
ModelSource = Callable[[str | None], tuple[Path, str | None] | None]
# (new fp32 file, its version) -> the model to serve: the CLI's loader picks the int8 twin where
# it passed its gate (cli/serve.load_clinic_model); by default the file itself, in fp32
ModelLoader = Callable[[Path, str | None], OnnxModel]


class ModelHolder:
    def __init__(
        self,
        model: OnnxModel,
        cfg: ServeConfig,
        heatmap_dir: Path,
        source: ModelSource | None = None,
        loader: ModelLoader | None = None,
        *,
        parallel_decode: bool = False,
    ) -> None:
        self.cfg = cfg
        # One image at a time by default: in the API process the request threads use the other
        # cores (measured with `benchmarks/service_load.py`, 2 cores, 8 clients: 23.3 studies/s
        # one at a time, 21.7 side by side, with 6 ms more CPU per study). `diagnostics worker`
        # keeps it off too: side by side was not measured for a worker alone on a machine.
        self.parallel_decode = parallel_decode
        self.loader = loader
        self.heatmap_dir = heatmap_dir
        self.source = source
        self.lock = threading.Lock()
        self.model = model
        self.scorer = self._scorer(model)
        self.last_error: str | None = None
        self.switches = 0

    def _scorer(self, model: OnnxModel) -> Scorer:
        return Scorer(
            model,
            self.cfg.qc,
            heatmap_dir=self.heatmap_dir,
            batch_size=self.cfg.model.batch_size,
            parallel_decode=self.parallel_decode,
        )

    def refresh(self) -> bool:
        """Switch to the source's current version if it changed. True if switched."""
        if self.source is None:
            return False
        with self.lock:  # one refresh at a time; scoring continues on the current model
            try:
                found = self.source(self.model.version)
                if found is None:
                    return False
                path, version = found
                new = (
                    self.loader(path, version)
                    if self.loader is not None
                    else OnnxModel(
                        path,
                        device=self.cfg.model.device,
                        threads=self.cfg.model.threads or None,
                        version=version,
                    )
                )
                if new.metadata.task != "cxr":
                    raise ValueError(f"version {version} is not a CXR model")
                scorer = self._scorer(new)
            except Exception as exc:  # keep serving the old model
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error(
                    "model refresh failed, still serving version %s: %s",
                    self.model.version,
                    self.last_error,
                )
                return False
            old = self.model
            self.model, self.scorer = new, scorer  # the worker reads these per batch
            self.last_error = None
            self.switches += 1
            log.info(
                "model switched: version %s (%s) -> %s (%s)",
                old.version,
                old.sha256[:12],
                new.version,
                new.sha256[:12],
            )
            return True

    def run(self, stop: threading.Event, every_s: float) -> None:
        while not stop.wait(every_s):
            self.refresh()
