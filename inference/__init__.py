"""cag-node inference: frames, candidates, the ONNX selector, VLM backends, model bundles.

This package imports nothing else of the project (not ``dicom_node``, not
``training``) and needs no torch unless the in-process VLM backend is used.
"""

__version__ = "0.1.0"
