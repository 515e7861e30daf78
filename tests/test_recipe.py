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


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["supervised", "self_supervised"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_compiled_step_equals_eager_on_the_same_weights(monkeypatch, make_project, device, mode):
    """train.compile: the compiled loss and gradients equal eager's, step for step from the same
    weights — the default semi-hard objective (whose mining decisions a training run's 1e-7
    drift can flip, so it is compared here rather than over a run) and self-supervised mode."""
    params = load_params(make_project({"train.device": device, "train.precision": "fp32", "train.width": 16,
                                       "train.embedding_dim": 16, "train.mode": mode}
                                      | ({"train.miner": None} if mode == "self_supervised" else {}))).train
    dev, meta = torch.device(device), {"channels": 1, "height": 16, "n_train_classes": 8}
    compiled_fns, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled_fns.append(fn) or real_compile(fn, **kw))
    built = []
    for compile_ in (False, True):
        torch.manual_seed(0)  # as the train stage does: the same initial weights
        built.append(recipe.build(params.model_copy(update={"compile": compile_}), meta, dev, per_class=8))
    (eager, compiled), g = built, torch.Generator().manual_seed(1)
    assert len(compiled_fns) == 1  # the compiled build did go through torch.compile, the eager one not
    assert all(torch.equal(a, b) for a, b in zip(eager.model.state_dict().values(), compiled.model.state_dict().values()))
    y = torch.arange(4, device=dev).repeat_interleave(8)
    for _ in range(3):  # three training states, each compared from identical weights
        x = torch.randint(0, 256, (32, 1, 16, 16), dtype=torch.uint8, generator=g).to(dev)
        results = []
        for b in built:
            b.optimizer.zero_grad(set_to_none=True)
            loss, stats = b.compute(x, y)
            loss.backward()
            results.append((loss.item(), [p.grad.clone() for p in b.model.parameters()], stats))
        (l0, g0, s0), (l1, g1, s1) = results
        assert l1 == pytest.approx(l0, rel=1e-5) and l0 > 0
        for a, b in zip(g0, g1):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        assert s0.keys() == s1.keys()
        eager.optimizer.step()
        compiled.model.load_state_dict(eager.model.state_dict())
