"""The Triton pass of the fused triplet objective equals its torch pass (and so pml's): loss,
gradient, statistics. On the CPU the kernel runs in Triton's interpreter (a subprocess: the
interpreter is chosen when triton is imported); on CUDA, compiled, where a GPU is present."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Each triplet type; P×K batches with K − 1 = 1, 3 (padded to 4) and 4 positives per anchor, and
# a batch wider than one block of negatives (160 > 128); one batch with a NaN embedding.
CHECK = textwrap.dedent("""
    import math, torch
    from tasks import fused_triplet
    from tasks.fused_triplet import FusedTriplet

    def run(objective, emb, labels, kernel):
        with fused_triplet.kernel_setting(kernel):
            x = emb.clone().requires_grad_(True)
            loss, stats = objective(x, labels)
            loss.backward()
            return loss.detach(), x.grad, stats, fused_triplet.KERNEL  # "never" if the kernel failed

    # Count the kernel's calls: reading KERNEL back only shows it was not switched off, not that it ran.
    calls = []
    torch_only = fused_triplet._kernel_pass
    fused_triplet._kernel_pass = lambda *a, **kw: calls.append(1) or torch_only(*a, **kw)
    device = DEVICE
    checked = 0
    for triplets, margin, mine in [("semihard", 0.2, 0.2), ("hard", 0.2, 0.2), ("all", 0.1, 0.3), ("all", 0.2, math.inf), ("easy", 0.5, 0.2)]:
        for p, k in [(8, 2), (8, 4), (8, 5), (32, 5)]:
            g = torch.Generator().manual_seed(p * k)
            emb = torch.randn(p * k, 16, generator=g).to(device)
            labels = (torch.randperm(p * k, generator=g) // k).to(device)
            objective = FusedTriplet(margin, mine, triplets, per_class=k)
            calls.clear()
            l0, g0, s0, _ = run(objective, emb, labels, "never")
            assert not calls
            l1, g1, s1, used = run(objective, emb, labels, "always")
            assert used == "always", "the kernel failed and was switched off"
            assert calls, "the kernel never ran"
            with torch.no_grad(), fused_triplet.kernel_setting("always"):  # no backward: no gradient counts
                torch.testing.assert_close(objective(emb, labels)[0], l1)
            assert float(l0) > 0 or triplets == "easy", (triplets, p, k)  # something is learnt from
            torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-7)
            assert float(s1["mined"]) == float(s0["mined"]), (triplets, p, k)
            for key in ("frac_active", "pos_distance", "neg_distance"):
                a, b = float(s1[key]), float(s0[key])
                assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-5 * max(1.0, abs(b)), (key, a, b)
            checked += 1
    emb[3, 0] = float("nan")
    l1 = run(FusedTriplet(0.2, 0.2, "semihard", per_class=5), emb, labels, "always")[0]
    assert torch.isnan(l1)
    print("checked", checked)
""")


def _check(device: str, env: dict) -> str:
    out = subprocess.run(
        [sys.executable, "-c", CHECK.replace("DEVICE", repr(device))],
        cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)} | env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_kernel_equals_the_torch_pass_in_the_interpreter():
    assert "checked 20" in _check("cpu", {"TRITON_INTERPRET": "1"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_kernel_equals_the_torch_pass_on_cuda():
    assert "checked 20" in _check("cuda", {})
