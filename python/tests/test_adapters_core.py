"""The adapters' common core (eplb_client.adapters.core) on CPU torch tensors, one rank: refusals
that name the parameter, host rebinding onto the region, the load path, a replaced parameter.

Needs torch: scripts/test_adapters.sh runs this file in the engines' venvs (target/venv-*), where
torch is installed; in target/pyvenv (numpy only) it is skipped with that reason.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed here: scripts/test_adapters.sh runs this file")

from eplb_client.adapters.core import AdapterError, Attachment, ExpertParam, check_layers  # noqa: E402

S, E = 4, 4


def _module(rows: int = S, shared: int = 0):
    m = torch.nn.Module()
    m.register_parameter("w13_weight", torch.nn.Parameter(torch.randn(rows + shared, 6, 8).to(torch.bfloat16),
                                                          requires_grad=False))
    m.register_parameter("w2_weight_scale_inv", torch.nn.Parameter(torch.rand(rows + shared, 2, 3), requires_grad=False))
    m.register_parameter("w2_input_scale", torch.nn.Parameter(torch.tensor([0.5]).expand(rows), requires_grad=False))
    return m


def _params(m):
    return [ExpertParam("w13_weight", m.w13_weight, "expert", owner=m, attr="w13_weight"),
            ExpertParam("w2_weight_scale_inv", m.w2_weight_scale_inv, "expert", owner=m, attr="w2_weight_scale_inv"),
            ExpertParam("w2_input_scale", m.w2_input_scale, "global", owner=m, attr="w2_input_scale")]


def _attach(layers, name):
    return Attachment(name, 0, 1, E, S, layers, np.tile(np.arange(S), (len(layers), 1)),
                      commit=lambda ls, p: None, agree=None)


def test_refusals_name_the_parameter():
    m = _module()
    with pytest.raises(AdapterError, match=r"layer 0 parameter 'w13_weight'.*dim 0 >= slots_per_rank"):
        check_layers([_params(m)], S + 1)
    bad = torch.nn.Module()
    bad.register_parameter("w13_weight", torch.nn.Parameter(torch.randn(6, S, 8).transpose(0, 1), requires_grad=False))
    with pytest.raises(AdapterError, match=r"parameter 'w13_weight'.*not contiguous"):
        check_layers([[ExpertParam("w13_weight", bad.w13_weight)]], S)
    other = _module()
    other.register_parameter("w13_weight", torch.nn.Parameter(torch.randn(S, 6, 9).to(torch.bfloat16), requires_grad=False))
    with pytest.raises(AdapterError, match=r"layer 1 parameter 'w13_weight': differs from layer 0"):
        check_layers([_params(m), _params(other)], S)
    with pytest.raises(AdapterError, match=r"parameter 'w2_weight_scale_inv': missing"):
        check_layers([[ExpertParam("w2_weight_scale_inv", None)]], S)


def test_host_params_are_rebound_onto_the_region_and_keep_their_values():
    m = _module(shared=1)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    att = _attach([_params(m)], f"core-rebind-{os.getpid()}")
    try:
        for n, p in m.named_parameters():
            assert torch.equal(p.detach().view(torch.uint8) if p.dtype == torch.bfloat16 else p.detach(),
                               before[n].view(torch.uint8) if p.dtype == torch.bfloat16 else before[n]), n
        view = att.region.tensor(0, "w13_weight")
        view[S] = 0  # the shared row lives in the region too (never listed as moving)
        assert int(m.w13_weight.detach()[S].view(torch.uint8).sum()) == 0
        assert m.w2_input_scale.stride() == (0,)  # a broadcast global stays broadcast
    finally:
        att.detach()


def test_loads_reach_the_ring_and_a_replaced_parameter_detaches():
    m = _module()
    att = _attach([_params(m)], f"core-loads-{os.getpid()}")
    counts = torch.tensor([[1, 2, 3, 4]], dtype=torch.int32)
    att.begin_step()
    att.end_step(counts)
    att.begin_step()
    got = att.region.read_step(0)
    assert got is not None and got[2].tolist() == [[1, 2, 3, 4]]
    # The engine replaces a parameter; a command arrives: the adapter detaches before applying.
    m.w13_weight = torch.nn.Parameter(torch.zeros(S, 6, 8).to(torch.bfloat16), requires_grad=False)
    h = att.region._h
    h[32] = 1  # cmd_seq odd: a command being written counts as pending
    assert att.begin_step() == []
    assert att.detached


def test_detach_gives_host_params_their_own_memory_back():
    m = _module(shared=1)
    att = _attach([_params(m)], f"core-detach-{os.getpid()}")
    values = {n: p.detach().clone() for n, p in m.named_parameters()}
    att.detach()  # unmaps the region: the parameters must not point into it any more
    for n, p in m.named_parameters():
        a, b = p.detach(), values[n]
        assert torch.equal(a.reshape(-1).view(torch.uint8) if a.dtype == torch.bfloat16 else a,
                           b.reshape(-1).view(torch.uint8) if b.dtype == torch.bfloat16 else b), n
    assert m.w13_weight.shape == (S + 1, 6, 8) and m.w2_input_scale.stride() == (0,)
