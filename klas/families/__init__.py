"""Anchor families: a registry over timm models and a uniform block view (stem -> blocks -> head)."""
from klas.families import families as _families  # noqa: F401  (registers the built-in families)
from klas.families._registry import (AnchorCfg, Family, FamilyCfg, create_anchor, create_family, get_family_cfg,
                                     list_families, register_family)
from klas.families.blockview import (BlockInfo, BlockView, ConvNeXtView, EfficientNetView, LevitView, MobileNetV3View,
                                     RegNetView, ResNetView, SwinView, ViTView, block_view, count_flops, input_note,
                                     register_view, stitch_layer_flops, stitchable, stitched_flops, supported_views)

__all__ = ["AnchorCfg", "Family", "FamilyCfg", "create_anchor", "create_family", "get_family_cfg", "list_families",
           "register_family", "BlockInfo", "BlockView", "ConvNeXtView", "EfficientNetView", "LevitView",
           "MobileNetV3View", "RegNetView", "ResNetView", "SwinView", "ViTView", "block_view", "input_note",
           "register_view", "supported_views",
           "count_flops", "stitch_layer_flops", "stitchable", "stitched_flops"]
