"""The matmul FLOP attribution of ``bench/train_step.py``'s per-phase breakdown (the bench itself is not run here)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench.train_step import PHASES, op_matmul_flops


def event(name: str, shapes: list, flops: int = 0) -> SimpleNamespace:
    return SimpleNamespace(name=name, input_shapes=shapes, flops=flops)


def test_profiler_counted_matmuls_pass_through():
    assert op_matmul_flops(event("aten::addmm", [[384], [10, 384], [384, 1152]], flops=123)) == 123
    assert op_matmul_flops(event("aten::mul", [[10, 384], [384]], flops=3840)) == 0  # elementwise: not matmul


def test_attention_flops_from_shapes_backward_twice_forward():
    q, k = [2, 6, 257, 64], [2, 6, 257, 64]
    forward = op_matmul_flops(event("aten::_scaled_dot_product_flash_attention_for_cpu", [q, k, k]))
    assert forward == pytest.approx(4 * 2 * 6 * 257 * 257 * 64)
    backward = op_matmul_flops(event("aten::_scaled_dot_product_flash_attention_for_cpu_backward", [q, q, k, k]))
    assert backward == pytest.approx(2 * forward)
    # the public wrapper has the same shapes: counting it too would count attention twice
    assert op_matmul_flops(event("aten::scaled_dot_product_attention", [q, k, k])) == 0


def test_patch_embedding_backward_counts_the_weight_gradient():
    grad_out, images, weight = [4, 384, 16, 16], [4, 3, 224, 224], [384, 3, 14, 14]
    flops = op_matmul_flops(event("aten::convolution_backward", [grad_out, images, weight]))
    assert flops == pytest.approx(2 * 4 * 384 * 16 * 16 * 3 * 14 * 14)


def test_phases_are_in_step_order():
    assert PHASES[0] == "collate" and PHASES.index("backward") < PHASES.index("optimizer") < PHASES.index("ema")
