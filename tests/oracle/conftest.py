"""Oracle-venv test setup: make ``graphadapt`` (repo root) and ``helpers`` (``tests/``) importable.

The oracle venv (transformers 4.57, AdapterHub ``adapters`` 1.3.0) does not install graphadapt; tests here
import it from the working tree.
"""

from __future__ import annotations

import pathlib
import sys

_TESTS = pathlib.Path(__file__).resolve().parents[1]
for _p in (str(_TESTS.parent), str(_TESTS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


class StochasticDepth(torch.nn.Module):
    """Faithful stand-in of ``torchvision.ops.StochasticDepth(mode="row")``: AdapterHub's DropPath
    (AdapterPlus, ``stochastic_depth``) imports torchvision, which the oracle venv lacks."""

    def __init__(self, p, mode):
        super().__init__()
        assert mode == "row"
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(survival)
        if survival > 0.0:
            noise.div_(survival)
        return x * noise


@pytest.fixture(scope="module")
def fake_torchvision():
    """Install the stand-in as ``torchvision.ops.stochastic_depth`` for one test module."""
    from adapters.methods import modeling as ah_modeling

    mods = {n: types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.stochastic_depth")}
    mods["torchvision.ops.stochastic_depth"].StochasticDepth = StochasticDepth
    saved = {n: sys.modules.get(n) for n in mods}
    sys.modules.update(mods)
    orig = ah_modeling.is_torchvision_available
    ah_modeling.is_torchvision_available = lambda: True
    yield
    ah_modeling.is_torchvision_available = orig
    for n, m in saved.items():
        if m is None:
            sys.modules.pop(n, None)
        else:
            sys.modules[n] = m
