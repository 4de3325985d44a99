"""msn-edge: Multi-scale Scanning Network anomalous sound detection, from training to the edge.

Importing this package must stay cheap and torch-free: the edge CLI goes through it.
"""

from msn_edge.runtime.version import __version__

__all__ = ["__version__"]
