"""The embedded anchor family: shipped weights against their card, and the anchor trainer's exact resume."""
from pathlib import Path

import pytest
import torch

import klas
from klas.data import load_fashion_mnist
from klas.families.trainer import Recipe, evaluate_accuracy, load_card, train_anchor
from klas.io import sha256_file

WEIGHTS = Path(klas.__file__).parent / "families" / "weights"


def test_card_describes_a_real_tradeoff():
    card = load_card("fmnist-deit")
    accs = [a["test_acc"] for a in card["anchors"]]
    flops = [a["flops"] for a in card["anchors"]]
    assert [a["name"] for a in card["anchors"]] == ["fmnist-deit-ti", "fmnist-deit-s", "fmnist-deit-b"]
    assert flops == sorted(flops) and accs == sorted(accs) and len(set(accs)) == 3
    assert accs[-1] - accs[0] >= 3.0, "anchors must span at least 3 points of test accuracy"
    # one recipe for all: same epochs for every anchor
    assert len({len(a["history"]) for a in card["anchors"]}) == 1
    total = sum((WEIGHTS / a["file"]).stat().st_size for a in card["anchors"])
    assert total <= 25 * 2**20
    for a in card["anchors"]:
        assert sha256_file(WEIGHTS / a["file"]) == a["sha256"]


def test_shipped_accuracy_matches_card():
    card = {a["name"]: a for a in load_card("fmnist-deit")["anchors"]}
    fam = klas.create_family("fmnist-deit", pretrained=True)
    test = load_fashion_mnist("test")
    for view in fam:
        acc = evaluate_accuracy(view, test)
        assert abs(acc - card[view.name]["test_acc"]) <= 0.3, (view.name, acc)
        assert view.flops == card[view.name]["flops"] and view.num_params == card[view.name]["params"]


def test_training_resumes_exactly(tmp_path):
    recipe = Recipe(epochs=2, batch_size=64, train_subset=256, seed=5)
    straight = tmp_path / "a"
    train_anchor("fmnist-deit", "fmnist-deit-ti", straight, recipe)
    # an interrupted run: one epoch with a 1-epoch schedule would differ, so stop after epoch 1 of the 2-epoch run
    resumed = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train_anchor("fmnist-deit", "fmnist-deit-ti", resumed, recipe, stop_after_epoch=1)
    train_anchor("fmnist-deit", "fmnist-deit-ti", resumed, recipe)
    from safetensors.torch import load_file
    a = load_file(str(straight / "fmnist-deit-ti.safetensors"))
    b = load_file(str(resumed / "fmnist-deit-ti.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_trained_weights_of_a_registered_family_load_with_their_classifier(tmp_path):
    """A registered (not embedded) family trained by ``train_family`` loads back from its weights folder with the
    trained 10-class head: the same outputs as the trained model (timm's filter would otherwise drop the head,
    which does not match the architecture's 1000-class pretrained cfg, and leave a random one)."""
    from klas.families import AnchorCfg, FamilyCfg
    from klas.families._registry import _FAMILIES, create_anchor, register_family
    from klas.families.trainer import train_family
    from klas.io import load_tensors

    args = dict(in_chans=1, num_classes=10, layers=(1, 1, 1, 1), channels=(8, 8, 16, 16), stem_width=8)
    cfg = register_family(FamilyCfg(name="test-tiny-resnets", anchors=(AnchorCfg("r", "resnet18", args),),
                                    input_shape=(1, 28, 28), dataset="fashion-mnist", num_classes=10))
    try:
        train_family(cfg.name, tmp_path, Recipe(epochs=1, batch_size=64, train_subset=128, seed=3))
        trained = create_anchor(cfg.anchors[0], cfg.input_shape)
        trained.model.load_state_dict(load_tensors(tmp_path / "r.safetensors"))
        loaded = klas.create_family(cfg.name, pretrained=True, weights=tmp_path)
    finally:
        _FAMILIES.pop(cfg.name)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(list(loaded)[0].model(x), trained.model.eval()(x), rtol=0, atol=0)
