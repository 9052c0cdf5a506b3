"""Structure recognition: roles of graph nodes from dataflow alone."""

from .recognize import recognize
from .types import (ROLES, AttentionBlock, FFNBlock, Layer, LinearSite, NormSite, ResidualSite,
                    StructureMap, Unmatched)

__all__ = ["recognize", "ROLES", "AttentionBlock", "FFNBlock", "Layer", "LinearSite", "NormSite",
           "ResidualSite", "StructureMap", "Unmatched"]
