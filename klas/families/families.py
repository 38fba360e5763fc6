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

# The embedded mixed family: a small ResNet (one basic block per stage, 8..64 channels, 2.1 MFLOPs; trained by `klas anchors
# train fmnist-mixed --anchor fmnist-resnet` with the fmnist-deit recipe) and fmnist-deit's S and B. Its maps (7x7,
# 4x4, 2x2, 1x1) stitch into the ViTs' 4x4 token grids across layouts (klas.stitch.MixedStitchLayer).
FMNIST_RESNET = dict(in_chans=1, num_classes=10, layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8)
register_family(FamilyCfg(
    name="fmnist-mixed",
    anchors=(AnchorCfg("fmnist-resnet", "resnet18", FMNIST_RESNET, "fmnist-resnet.safetensors"),
             *(AnchorCfg(f"fmnist-deit-{size}", "vit_tiny_patch16_224",
                         dict(FMNIST_VIT, embed_dim=width, num_heads=width // 16), f"fmnist-deit-{size}.safetensors")
               for size, width in (("s", 32), ("b", 64)))),
    input_shape=(1, 28, 28), dataset="fashion-mnist", num_classes=10,
    input=dict(mean=(0.2860,), std=(0.3530,), interpolation="bilinear", crop_pct=1.0, crop_mode="center"),
    description="klas's embedded mixed family: a small ResNet (trained by `klas anchors train fmnist-mixed --anchor "
                "fmnist-resnet`) with fmnist-deit's S and B, stitched CNN -> ViT across layouts"))

# The embedded language-model family: three Llama-architecture decoders over one byte-level BPE tokenizer (8192
# tokens), trained from scratch on the Python documentation by `klas anchors train pydoc-llama`; costs are per token
# at a 128-token context. Widths 48 / 128 / 256, depths 4 / 5 / 6, head dims 24 / 32 / 64, KV heads 1 / 2 / 2.
PYDOC_LLAMA = dict(vocab_size=8192, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0,
                   rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
register_family(FamilyCfg(
    name="pydoc-llama", task="causal-lm",
    anchors=tuple(
        AnchorCfg(f"pydoc-llama-{size}", "llama",
                  dict(PYDOC_LLAMA, hidden_size=d, num_hidden_layers=n, num_attention_heads=h, head_dim=hd,
                       num_key_value_heads=kv, intermediate_size=inter), f"pydoc-llama-{size}.safetensors")
        for size, d, n, h, hd, kv, inter in (("s", 48, 4, 2, 24, 1, 128), ("m", 128, 5, 4, 32, 2, 384),
                                             ("l", 256, 6, 4, 64, 2, 768))),
    input_shape=(128,), dataset="python-docs", num_classes=8192, input=dict(tokenizer="pydoc-llama-tokenizer.json"),
    description="klas's embedded language models: Llama decoders 48/128/256 wide, 4/5/6 layers, 8k BPE, trained on "
                "the Python docs by `klas anchors train pydoc-llama`"))
