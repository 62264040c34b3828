"""Logging for a running node: level and optional file from ``config.logging``.

PHI policy: nothing logged at INFO or above carries
patient data.  Our modules log UIDs, sizes, AE titles and hosts only; the
listener never decodes patient attributes (PatientID is only hashed).
pynetdicom's own loggers are kept at WARNING unless DEBUG is asked for, because
its INFO/DEBUG output can dump data set contents.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from dicom_node.config import Config

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(config: Config, verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else getattr(logging, config.logging.level)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    log_file: Optional[Path] = config.resolve(config.logging.file) if config.logging.file else None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    logging.basicConfig(level=level, format=FORMAT, handlers=handlers, force=True)
    noisy = logging.DEBUG if level == logging.DEBUG else logging.WARNING
    for name in ("pynetdicom", "apscheduler", "highdicom"):
        logging.getLogger(name).setLevel(noisy)
    # A poll job still running when its next tick comes is skipped by design
    # (max_instances=1); apscheduler reports each skip as a WARNING.
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR if level > logging.DEBUG else logging.DEBUG)
    logging.getLogger("pydicom").setLevel(logging.ERROR if level > logging.DEBUG else logging.DEBUG)
