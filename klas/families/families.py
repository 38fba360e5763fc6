"""Registered families. timm families load their weights from the hub (or a local directory given by the user);
``fmnist-deit`` is klas's own embedded family, trained by ``klas anchors train`` and shipped with the package.
"""
from __future__ import annotations

from klas.families._registry import AnchorCfg, FamilyCfg, register_family

IMAGENET = dict(input_shape=(3, 224, 224), dataset="imagenet", num_classes=1000)

register_family(FamilyCfg(
    name="deit",
    anchors=(AnchorCfg("deit-ti", "deit_tiny_patch16_224"), AnchorCfg("deit-s", "deit_small_patch16_224"),
             AnchorCfg("deit-b", "deit_base_patch16_224")),
    description="DeiT-Ti/S/B (Touvron et al. 2021), 12 blocks each, one stage", **IMAGENET))

register_family(FamilyCfg(
    name="swin",
    anchors=(AnchorCfg("swin-t", "swin_tiny_patch4_window7_224"), AnchorCfg("swin-s", "swin_small_patch4_window7_224"),
             AnchorCfg("swin-b", "swin_base_patch4_window7_224")),
    description="Swin-T/S/B (Liu et al. 2021), 4 stages; stitching within a stage", **IMAGENET))

register_family(FamilyCfg(
    name="resnet",
    anchors=(AnchorCfg("resnet18", "resnet18"), AnchorCfg("resnet34", "resnet34"), AnchorCfg("resnet50", "resnet50")),
    description="ResNet-18/34/50, 4 stages; stitching within a stage", **IMAGENET))

# The embedded family: DeiT-shaped ViTs for 28x28 grey images (7x7 patches -> 16 tokens + class token),
# 12 blocks each, width doubling per step (about 4x FLOPs per step, like DeiT-Ti -> S -> B), head dim 16.
FMNIST_VIT = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, depth=12, mlp_ratio=4.0)
register_family(FamilyCfg(
    name="fmnist-deit",
    anchors=tuple(
        AnchorCfg(f"fmnist-deit-{size}", "vit_tiny_patch16_224",
                  dict(FMNIST_VIT, embed_dim=width, num_heads=width // 16), f"fmnist-deit-{size}.safetensors")
        for size, width in (("ti", 16), ("s", 32), ("b", 64))),
    input_shape=(1, 28, 28), dataset="fashion-mnist", num_classes=10,
    # 28x28 grey, Fashion-MNIST's own statistics, no resize or crop: exactly how the anchors were trained
    input=dict(mean=(0.2860,), std=(0.3530,), interpolation="bilinear", crop_pct=1.0, crop_mode="center"),
    description="klas's embedded Fashion-MNIST family: ViT widths 16/32/64, 12 blocks, trained by `klas anchors train`"))
