from pathlib import Path

import pytest
import torch

from tasks.backbones import GeM, SmallCNN, build_trunk, pretrained_file
from tasks.errors import ParamsError


def _cfg(**kw):
    return {"backbone": "small_cnn", "width": 8, "in_channels": 1, "image_size": 16, "pooling": "avg"} | kw


def test_small_cnn_stops_pooling_at_one_pixel():
    # 8×8 digits: three pools reach 1×1; a fourth would fail.
    net = SmallCNN(in_channels=1, width=4, image_size=8)
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 4)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.modules()) == 3


@pytest.mark.parametrize("image_size", [8, 28])  # 8: the last block has no pool
def test_small_cnn_relu_after_pool_is_exactly_the_textbook_order(image_size):
    """ReLU after the max-pool (a quarter of the values) gives the same output and gradients, bit
    for bit, as Conv-4's conv → BN → ReLU → pool — the same modules, in that order."""
    torch.manual_seed(0)
    net = SmallCNN(in_channels=1, width=8, image_size=image_size, pooling="gem")
    ours = list(net.features)
    textbook = []
    for m in ours:  # move each ReLU back in front of the max-pool it follows
        if isinstance(m, torch.nn.ReLU) and isinstance(textbook[-1], torch.nn.MaxPool2d):
            textbook.insert(len(textbook) - 1, m)
        else:
            textbook.append(m)
    assert textbook != ours
    x = torch.randn(6, 1, image_size, image_size)
    results = []
    for layers in (ours, textbook):
        net.zero_grad()
        out = torch.nn.Sequential(*layers)(x)
        (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
    (o0, g0), (o1, g1) = results
    assert torch.equal(o0, o1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_gem_is_average_at_p_1_and_tends_to_max():
    x = torch.rand(2, 3, 4, 4) + 0.1
    gem = GeM(p=1.0)
    torch.testing.assert_close(gem(x), x.mean(dim=(-2, -1), keepdim=True))
    # mean(x^p)^(1/p) is within a factor (1/16)^(1/p) of the max over 16 cells: 3 % at p = 100.
    torch.testing.assert_close(GeM(p=100.0)(x), x.amax(dim=(-2, -1), keepdim=True), rtol=0.03, atol=0)
    assert GeM().p.requires_grad  # p is learnt


def test_gem_pooling_in_small_cnn_and_resnet():
    trunk, dim = build_trunk(_cfg(pooling="gem"))
    assert any(isinstance(m, GeM) for m in trunk.modules()) and trunk(torch.rand(2, 1, 16, 16)).shape == (2, dim)
    resnet, dim = build_trunk(_cfg(backbone="resnet18", image_size=32, pooling="gem"))
    assert isinstance(resnet.trunk.avgpool, GeM) and resnet(torch.rand(2, 1, 32, 32)).shape == (2, 512)


def test_gem_on_a_backbone_without_average_pooling_is_a_clear_error():
    with pytest.raises(ParamsError, match="train.pooling"):
        build_trunk(_cfg(backbone="vit_b_16", image_size=224, pooling="gem"))


def test_pretrained_weights_from_a_local_file(tmp_path):
    import torchvision

    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    trunk, _ = build_trunk(_cfg(backbone="resnet18", in_channels=3), pretrained=str(path))
    torch.testing.assert_close(trunk.conv1.weight, source.conv1.weight)


def test_default_weights_come_only_from_torchs_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ParamsError, match="not in torch's cache"):
        pretrained_file("resnet18", "default")
    # Put a file where torch would have cached the default weights: it is used, not downloaded.
    path = Path(torch.hub.get_dir()) / "checkpoints"
    path.mkdir(parents=True)
    name = torchvision.models.get_model_weights("resnet18").DEFAULT.url.rsplit("/", 1)[-1]
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path / name)
    assert pretrained_file("resnet18", "default") == path / name
    trunk, _ = build_trunk(_cfg(backbone="resnet18", in_channels=3), pretrained="default")
    assert trunk is not None


def test_wrong_or_missing_weights_are_clear_errors(tmp_path):
    with pytest.raises(ParamsError, match="no weights file"):
        build_trunk(_cfg(backbone="resnet18", in_channels=3), pretrained=str(tmp_path / "absent.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"nope": torch.zeros(1)}, bad)
    with pytest.raises(ParamsError, match="do not fit"):
        build_trunk(_cfg(backbone="resnet18", in_channels=3), pretrained=str(bad))
    with pytest.raises(ParamsError, match="small_cnn has no pretrained"):
        build_trunk(_cfg(), pretrained=str(bad))
