"""A family from the config (``[family]`` / ``[run] family = "file.toml"``): parsing, one-line errors naming the anchor
and the file, the data config, and the cache key over the definition and the weights files."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from klas.config import load_config
from klas.errors import KlasError
from klas.families import create_family

R_ARGS = dict(layers=[1, 1, 1, 1], channels=[4, 8, 16, 32], stem_width=4, in_chans=1, num_classes=3)


def save(arch: str, args: dict, path: Path, fmt: str = "safetensors", wrap: str | None = None, seed: int = 0) -> Path:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    sd = {k: v.contiguous() for k, v in timm.create_model(arch, **args).state_dict().items()}
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save({wrap: sd, "epoch": 3} if wrap else sd, path)
    return path


def family_toml(tmp: Path, anchors: list[dict], extra: str = "", name: str = "cfg-fam") -> Path:
    lines = ["[family]", f'name = "{name}"', extra, ""]
    for a in anchors:
        lines.append("[[family.anchors]]")
        for k, v in a.items():
            if isinstance(v, dict):
                v = "{" + ", ".join(f"{kk} = {vv!r}".replace("'", '"') for kk, vv in v.items()) + "}"
                lines.append(f"{k} = {v}")
            else:
                lines.append(f'{k} = "{v}"')
        lines.append("")
    p = tmp / "user.toml"
    p.write_text("\n".join(lines))
    return p


@pytest.fixture()
def two(tmp_path):
    a = save("resnet18", R_ARGS, tmp_path / "a.safetensors")
    b = save("resnet18", dict(R_ARGS, channels=[8, 16, 32, 64], stem_width=8), tmp_path / "b.pth", "pth", "state_dict")
    return [dict(name="ra", arch="resnet18", model_args=R_ARGS, weights="a.safetensors"),
            dict(name="rb", arch="resnet18", model_args=dict(R_ARGS, channels=[8, 16, 32, 64], stem_width=8),
                 weights="b.pth")]


def test_family_section_builds_the_users_weights(tmp_path, two):
    from safetensors.torch import load_file

    cfg = load_config(family_toml(tmp_path, two, "[family.input]\nchannels = 1\nsize = 28\nmean = [0.5]\n"
                                  "std = [0.2]\ncrop_pct = 1.0"))
    assert cfg.run.family == "cfg-fam" and cfg.family_cfg.input_shape == (1, 28, 28)
    fam = create_family("cfg-fam", pretrained=True)
    assert [v.name for v in fam] == ["ra", "rb"]
    want = load_file(str(tmp_path / "a.safetensors"))
    got = fam["ra"].model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)  # the file, bit for bit
    wanted_b = torch.load(tmp_path / "b.pth", weights_only=True)["state_dict"]  # unwrapped from 'state_dict'
    assert all(torch.equal(wanted_b[k], fam["rb"].model.state_dict()[k]) for k in wanted_b)
    assert fam.data_config == dict(input_size=(1, 28, 28), interpolation="bicubic", mean=(0.5,), std=(0.2,),
                                   crop_pct=1.0, crop_mode="center")  # the rest from timm's resnet18 cfg
    # the run's config.toml holds the family (absolute paths): loading it again gives the same config and key
    again = load_config(raw=__import__("tomllib").loads(cfg.to_toml()))
    assert again == cfg and again.family_key == cfg.family_key


def test_data_config_defaults_to_timm_resolve(tmp_path, two):
    from timm.data import resolve_model_data_config

    rgb = [dict(a, model_args={**a["model_args"], "in_chans": 3}) for a in two]
    for a in rgb:
        save("resnet18", a["model_args"], tmp_path / a["weights"], a["weights"].rsplit(".", 1)[1])
    load_config(family_toml(tmp_path, rgb))
    fam = create_family("cfg-fam", pretrained=True)
    assert fam.data_config == resolve_model_data_config(fam[0].model)


@pytest.mark.parametrize("dataset, channels, size", [("fashion-mnist", 1, 28), ("cifar100", 3, 32)])
def test_data_config_defaults_to_a_builtin_datasets_statistics(tmp_path, two, dataset, channels, size):
    """A family on a built-in dataset sees the images as they are, with the dataset's own statistics, where its input
    spec is silent -- not the architecture's ImageNet pretrained cfg; what the spec gives overrides key by key."""
    from klas.data.datasets import BUILTIN_SPECS

    anchors = [dict(a, model_args={**a["model_args"], "in_chans": channels}) for a in two]
    for a in anchors:
        save("resnet18", a["model_args"], tmp_path / a["weights"], a["weights"].rsplit(".", 1)[1])
    spec = BUILTIN_SPECS[dataset]
    load_config(family_toml(tmp_path, anchors, f'dataset = "{dataset}"\n[family.input]\nchannels = {channels}\n'
                                               f"size = {size}\ncrop_pct = 0.9"))
    fam = create_family("cfg-fam", pretrained=True)
    assert fam.data_config == dict(input_size=(channels, size, size), interpolation="bilinear", mean=spec.mean,
                                   std=spec.std, crop_pct=0.9, crop_mode="center")
    assert len(spec.mean) == channels


def test_family_file_from_run_section(tmp_path, two):
    fam_file = family_toml(tmp_path, two)
    fam_file.rename(tmp_path / "family.toml")
    (tmp_path / "sub").mkdir()
    cfg_path = tmp_path / "sub" / "run.toml"
    cfg_path.write_text('[run]\nfamily = "../family.toml"\n[data]\nroot = "/x"\n')
    cfg = load_config(cfg_path)
    assert cfg.run.family == "cfg-fam" and Path(cfg.family_cfg.anchors[0].weights).is_absolute()


@pytest.mark.parametrize("change, match", [
    (lambda a: a[0].update(arch="resnet_nope"), r"user\.toml: \[family\] anchors\[0\] \(ra\) arch = 'resnet_nope': "
                                                 r"unknown timm architecture"),
    (lambda a: a[1].update(weights="missing.safetensors"), r"anchors\[1\] \(rb\) weights = 'missing.safetensors': "
                                                            r"file not found"),
    (lambda a: a[0].update(colour="red"), r"anchors\[0\] colour: unknown key"),
    (lambda a: a.pop(), r"a family needs at least two anchors"),
    (lambda a: a[1].update(name="ra"), r"name 'ra' is used twice"),
])
def test_config_mistakes_at_load(tmp_path, two, change, match):
    change(two)
    with pytest.raises(KlasError, match=match):
        load_config(family_toml(tmp_path, two))


def test_weights_mistakes_name_anchor_and_file(tmp_path, two):
    (tmp_path / "a.safetensors").write_bytes(b"garbage, not safetensors")
    load_config(family_toml(tmp_path, two))
    with pytest.raises(KlasError, match=r"a\.safetensors: unreadable weights file \(anchor 'ra'\)"):
        create_family("cfg-fam", pretrained=True)
    # the other anchor's file in its place: every shape differs; a head for 5 classes: one shape mismatch
    save("resnet18", dict(R_ARGS, channels=[8, 16, 32, 64], stem_width=8), tmp_path / "a.safetensors")
    with pytest.raises(KlasError, match=r"a\.safetensors: weights do not fit anchor 'ra' .*: \d+ shape mismatches"):
        create_family("cfg-fam", pretrained=True)
    save("resnet18", dict(R_ARGS, num_classes=5), tmp_path / "a.safetensors")
    with pytest.raises(KlasError, match=r"2 shape mismatches \(fc\.bias \(5,\) in the file vs \(3,\), fc\.weight"):
        create_family("cfg-fam", pretrained=True)
    import timm
    from safetensors.torch import save_file
    sd = timm.create_model("resnet18", **R_ARGS).state_dict()
    sd.pop("fc.bias")
    sd["extra.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "a.safetensors"))
    with pytest.raises(KlasError, match=r"1 missing keys \(fc\.bias\); 1 unexpected keys \(extra\.weight\)"):
        create_family("cfg-fam", pretrained=True)


def test_anchors_that_cannot_be_stitched(tmp_path, two):
    vit = dict(img_size=28, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=1)
    save("vit_tiny_patch16_224", dict(vit, patch_size=7), tmp_path / "v7.safetensors")
    save("vit_tiny_patch16_224", dict(vit, patch_size=4), tmp_path / "v4.safetensors")
    mixed = [two[0], dict(name="v", arch="vit_tiny_patch16_224", model_args=dict(vit, patch_size=7),
                          weights="v7.safetensors")]
    load_config(family_toml(tmp_path, mixed, "[family.input]\nchannels = 1\nsize = 28"))
    fam = create_family("cfg-fam", pretrained=True)  # a CNN and a ViT: stitched across layouts
    from klas.families.blockview import cross_layout

    a, b = fam[0], fam[1]
    assert any(cross_layout(a, i, b, j) for i in range(a.depth) for j in range(b.depth))
    vits = [dict(name=f"v{p}", arch="vit_tiny_patch16_224", model_args=dict(vit, patch_size=p),
                 weights=f"v{p}.safetensors") for p in (7, 4)]
    load_config(family_toml(tmp_path, vits, "[family.input]\nchannels = 1\nsize = 28"))
    with pytest.raises(KlasError, match=r"no two anchors have blocks with the same output resolution"):
        create_family("cfg-fam", pretrained=True)


def test_registered_names_and_conflicts(tmp_path, two):
    with pytest.raises(KlasError, match=r"name = 'deit': taken by a registered family"):
        load_config(family_toml(tmp_path, two, name="deit"))
    p = family_toml(tmp_path, two)
    p.write_text(p.read_text() + '\n[run]\nfamily = "resnet"\n')
    with pytest.raises(KlasError, match=r"\[run\] family = 'resnet': the \[family\] section .* defines 'cfg-fam'"):
        load_config(p)
    with pytest.raises(KlasError, match=r"\[family.input\] size = 3: expected an integer"):
        load_config(family_toml(tmp_path, two, "[family.input]\nsize = 3"))


def test_cache_key_follows_definition_and_weights(tmp_path, two):
    p = family_toml(tmp_path, two)
    k0 = load_config(p).family_key
    assert load_config(p).family_key == k0
    save("resnet18", R_ARGS, tmp_path / "a.safetensors", seed=1)  # other weights, same file name
    k1 = load_config(p).family_key
    assert k1["weights"]["ra"] != k0["weights"]["ra"] and k1["weights"]["rb"] == k0["weights"]["rb"]
    p.write_text(p.read_text().replace('name = "cfg-fam"', 'name = "cfg-fam"\nnum_classes = 3'))
    assert load_config(p).family_key["definition"] == k1["definition"]  # 3 was already the models' head
