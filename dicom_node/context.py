"""What processing a study needs from the node, typed: :class:`NodeContext`.

The node builds one at start-up and hands it to ``dicom_node.pipeline.process_study`` (or the
``process_fn`` a test or an embedding gives it).  :class:`Models` loads the bundle and the model
runtimes once, on first use (receiving never needs them), and shares them between workers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from dicom_node.config import Config
from dicom_node.journal import Journal
from dicom_node.metrics import NodeMetrics
from dicom_node.spool import Spool

if TYPE_CHECKING:  # pragma: no cover
    from dicom_node.outbox import Outbox


class Models:
    """The bundle and its runtimes (selector, lesion model, VLM backend), each loaded once."""

    def __init__(self, config: Config, bundle_dir: Optional[Path] = None):
        self.config = config
        self.bundle_dir = Path(bundle_dir) if bundle_dir else config.bundle_dir
        self._lock = threading.RLock()
        self._bundle = None
        self._selector = None
        self._lesions = None
        self._lesions_loaded = False
        self._vlm = None
        self._vlm_loaded = False

    @property
    def bundle(self):
        """The model bundle (``Bundle.load`` verifies it)."""
        with self._lock:
            if self._bundle is None:
                from inference.bundle import Bundle

                self._bundle = Bundle.load(self.bundle_dir)
            return self._bundle

    def selector(self):
        with self._lock:
            if self._selector is None:
                from inference.selector import Selector

                c = self.config.selector
                self._selector = Selector(self.bundle, threads=c.threads, batch_size=c.batch_size,
                                          providers=c.providers)
            return self._selector

    def lesion_model(self):
        """The bundle's lesion model, or None when it has none or ``lesions.enabled`` is false."""
        if not self.config.lesions.enabled:
            return None
        with self._lock:
            if not self._lesions_loaded:
                if self.bundle.manifest.lesions is not None:
                    from inference.lesions import LesionModel

                    c = self.config.lesions
                    self._lesions = LesionModel(self.bundle, threads=c.threads, providers=c.providers)
                self._lesions_loaded = True
            return self._lesions

    def vlm(self):
        """The report backend ``vlm.backend`` names, or None for ``none``."""
        with self._lock:
            if not self._vlm_loaded:
                if self.config.vlm.backend != "none":
                    from inference.vlm import load_backend

                    self._vlm = load_backend(self.config.vlm, self.bundle)
                self._vlm_loaded = True
            return self._vlm


@dataclass
class NodeContext:
    """The node's parts a study's processing uses."""

    config: Config
    journal: Journal
    spool: Spool
    models: Models
    metrics: NodeMetrics = field(default_factory=NodeMetrics)
    outbox: Optional["Outbox"] = None

    @property
    def bundle(self):
        return self.models.bundle
