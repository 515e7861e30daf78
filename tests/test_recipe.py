import pytest
import torch

from tasks import recipe
from tasks.params import load_params


@pytest.mark.parametrize("precision,device,native,expected", [
    ("auto", "cuda", False, True),
    ("auto", "cpu", True, True),    # bf16 in hardware: the faster choice
    ("auto", "cpu", False, False),  # emulated bf16 would be slower than fp32
    ("fp32", "cuda", True, False),
    ("fp32", "cpu", True, False),
    ("bf16", "cpu", False, True),   # asked for: honoured even where it is emulated
])
def test_precision_auto_picks_bf16_where_the_hardware_has_it(monkeypatch, make_project, precision, device, native, expected):
    monkeypatch.setattr(recipe, "native_bf16_cpu", lambda: native)
    params = load_params(make_project({"train.precision": precision}))
    assert recipe.use_bf16(params.train, torch.device(device)) is expected
