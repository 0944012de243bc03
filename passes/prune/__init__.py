"""Pruning passes.

* ``PruneMagnitude`` (``prune-magnitude``): unstructured magnitude pruning, per layer or global.
* ``PruneNM`` (``prune-nm``): N:M (2:4) sparsity along input channels, TensorRT's sparse layout.
* ``PruneChannels`` (``prune-channels``): structured channel removal on a channel-dependency
  graph (``depgraph`` + ``analysis``), importance criteria in ``importance``, the graph surgery
  in ``rewrite``.
"""

from passes import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, __path__)
