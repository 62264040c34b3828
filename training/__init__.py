"""cag-node training: synthetic angiograms, datasets, selector/VLM training, export, evaluation.

Reuses ``inference`` preprocessing so training and serving see the same pixels.
"""

__version__ = "0.1.0"
