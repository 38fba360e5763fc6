"""klas: KL-divergence based Anchor Stitching, packaged for deployment.

family -> probes -> scores -> selection -> supernet -> evaluation -> export -> runtime
"""
__version__ = "0.1.0"

from klas.errors import KlasError
from klas.families import create_family, list_families

__all__ = ["KlasError", "create_family", "list_families", "__version__"]
