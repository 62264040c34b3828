"""cag-node: the DICOM side (network, spool, journal, scheduler, SR/KOS, CLI)."""

__version__ = "0.1.0"
