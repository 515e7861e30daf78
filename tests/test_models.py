import pytest
import torch

from tasks.errors import ParamsError
from tasks.models import EmbeddingNet, load_checkpoint, pick_device, save_checkpoint


def _config(**kw):
    return {"backbone": "small_cnn", "width": 8, "embedding_dim": 12, "in_channels": 1, "image_size": 16} | kw


def test_embeddings_are_unit_norm_with_the_configured_dim():
    model = EmbeddingNet(_config()).eval()
    out = model(torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8))
    assert out.shape == (5, 12)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))


def test_torchvision_backbone_takes_grayscale():
    model = EmbeddingNet(_config(backbone="resnet18", image_size=32)).eval()
    out = model(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    assert out.shape == (2, 12)


def test_unknown_backbone_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="train.backbone"):
        EmbeddingNet(_config(backbone="no_such_net"))


def test_checkpoint_roundtrip_is_weights_only_loadable(tmp_path):
    torch.manual_seed(0)
    model = EmbeddingNet(_config(in_channels=3)).eval()
    path = tmp_path / "m.pt"
    sha = save_checkpoint(model, path, {"epochs": 3})
    assert len(sha) == 64
    state = torch.load(path, weights_only=True)  # no pickled code objects
    assert state["epochs"] == 3 and state["config"]["in_channels"] == 3
    again = load_checkpoint(path)
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(model(x), again(x))


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_pick_device_names_the_key_of_a_gpu_this_machine_lacks(gpus):
    """A stage run by hand (no flow preflight) learns which key asks for the GPU, before any CUDA call
    fails on it (cuda:3 on one GPU used to be a torch error at the first tensor moved)."""
    gpus(1)
    with pytest.raises(ParamsError, match=r"^evaluate\.device: 'cuda:3' asked for, but this machine has 1 GPU\(s\)$"):
        pick_device("cuda:3", "evaluate")
    assert pick_device("cuda:0", "evaluate") == torch.device("cuda:0")
    gpus(0)
    with pytest.raises(ParamsError, match=r"^device: 'cuda' asked for, but CUDA is not available here$"):
        pick_device("cuda")


def test_the_classes_a_model_trained_on_survive_a_load_and_save(tmp_path):
    model = EmbeddingNet(_config())
    save_checkpoint(model, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").trained_classes is None  # a checkpoint without them
    model.trained_classes = ["cat", "dog"]
    save_checkpoint(model, tmp_path / "m.pt")
    again = load_checkpoint(tmp_path / "m.pt")
    assert again.trained_classes == ["cat", "dog"]
    save_checkpoint(again, tmp_path / "copy.pt")
    assert torch.load(tmp_path / "copy.pt", weights_only=True)["trained_classes"] == ["cat", "dog"]
