"""Which multi-scale deformable attention runs: Mask2Former's compiled CUDA op when it is
importable and the tensors are on CUDA, the grid_sample path otherwise; both the same function."""
from __future__ import annotations

import types

import torch

import maps.modeling.pixel_decoder.ms_deform_attn as msda
from maps.modeling.pixel_decoder.ms_deform_attn import (KERNEL, PYTORCH, MSDeformAttn,
                                                        deform_attn_backend,
                                                        ms_deform_attn_core_pytorch)


def _fake_compiled_op():
    """Stands in for the MultiScaleDeformableAttention extension (same signatures)."""

    def forward(value, shapes, level_start, locations, weights, im2col_step):
        assert value.dtype == torch.float32 and level_start.tolist() == [0, 64, 80]
        return ms_deform_attn_core_pytorch(value, shapes, locations, weights)

    def backward(value, shapes, level_start, locations, weights, grad_output, im2col_step):
        with torch.enable_grad():
            v, loc, w = (t.detach().requires_grad_() for t in (value, locations, weights))
            out = ms_deform_attn_core_pytorch(v, shapes, loc, w)
            return torch.autograd.grad(out, (v, loc, w), grad_output)

    return types.SimpleNamespace(ms_deform_attn_forward=forward,
                                 ms_deform_attn_backward=backward)


def _inputs():
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[8, 8], [4, 4], [2, 2]])
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    query = torch.randn(2, 10, 32, generator=g)
    ref = torch.rand(2, 10, 3, 2, generator=g)
    return query, ref, torch.randn(2, s, 32, generator=g), shapes


def test_cpu_and_missing_extension_use_the_pytorch_path(monkeypatch):
    assert deform_attn_backend("cpu") == PYTORCH
    monkeypatch.setattr(msda, "_MSDA", None)
    assert deform_attn_backend("cuda") == PYTORCH
    monkeypatch.setattr(msda, "_MSDA", _fake_compiled_op())
    assert deform_attn_backend("cuda") == KERNEL
    assert deform_attn_backend("cpu") == PYTORCH
    monkeypatch.setenv("MAPS_MSDA_PYTORCH", "1")
    assert deform_attn_backend("cuda") == PYTORCH


def test_kernel_path_computes_the_pytorch_function_and_gradients(monkeypatch):
    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    with torch.no_grad():  # off the init's symmetric offsets
        layer.sampling_offsets.weight.normal_(0, 0.1)
        layer.attention_weights.weight.normal_(0, 0.1)
    query, ref, flat, shapes = _inputs()

    def run():
        layer.zero_grad()
        q = query.clone().requires_grad_()
        out = layer(q, ref, flat, shapes)
        out.square().sum().backward()
        return out.detach(), q.grad, layer.sampling_offsets.weight.grad.clone()

    plain = run()
    assert layer.last_backend == PYTORCH
    monkeypatch.setattr(msda, "_MSDA", _fake_compiled_op())
    monkeypatch.setattr(msda, "deform_attn_backend", lambda device: KERNEL)
    kernel = run()
    assert layer.last_backend == KERNEL
    for a, b in zip(plain, kernel):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
