"""Cube blocks of the paper's Tab. 1 baselines (CycleMLP, MPViT), the models built on them and the Tab. 5 probe.

Known answers: a Cycle FC is a deformable 1 x 1 convolution with CycleMLP's fixed offsets (torchvision's
``deform_conv2d`` is the oracle) and moves an impulse where its offsets say; factorised attention equals its
formula written out with einsum; the probe equals an MLP on the masked mean. Odd sizes throughout.
"""

from __future__ import annotations

import pytest
import torch

from isg.model import CycleFC, CycleMLPBlock, FactorAttention, MPViTBlock, create_model
from isg.model.layers import cycle_offsets, shift_channels


@pytest.mark.parametrize("kernel", [(1, 3), (3, 1), (1, 5), (7, 1)])
def test_cycle_offsets_cycle_through_the_pseudo_kernel(kernel):
    offsets = cycle_offsets(11, kernel)  # [C, 2] (dy, dx)
    k = max(kernel)
    axis = 0 if kernel[1] == 1 else 1
    expected = [(c + k // 2) % k - k // 2 for c in range(11)]  # CycleMLP: channel 0 at the centre, then +1, ...
    assert offsets[:, axis].tolist() == expected and (offsets[:, 1 - axis] == 0).all()
    if k == 3:
        assert expected[:4] == [0, 1, -1, 0]
    with pytest.raises(ValueError, match="1 x k"):
        cycle_offsets(4, (3, 3))


@pytest.mark.parametrize("shape", [(1, 5, 3, 5), (2, 7, 4, 1), (3, 4, 1, 6)])
def test_shift_channels_moves_an_impulse_by_the_offset(shape):
    B, C, H, W = shape
    offsets = torch.stack([torch.randint(-2, 3, (C,)), torch.randint(-2, 3, (C,))], 1)
    x = torch.zeros(shape)
    b, c, i, j = B - 1, C - 1, H // 2, W // 2
    x[b, c, i, j] = 1.0
    out = shift_channels(x, offsets)
    dy, dx = offsets[c].tolist()
    ti, tj = i - dy, j - dx  # out[i', j'] = x[i' + dy, j' + dx]
    if 0 <= ti < H and 0 <= tj < W:
        assert out[b, c, ti, tj] == 1.0 and out.sum() == 1.0
    else:
        assert out.sum() == 0.0  # shifted off the map: zero padding


@pytest.mark.parametrize("kernel", [(1, 3), (3, 1), (1, 5)])
@pytest.mark.parametrize("size", [(3, 5), (4, 4), (1, 7)])
def test_cycle_fc_is_deformable_1x1_conv_with_cyclemlp_offsets(kernel, size):
    ops = pytest.importorskip("torchvision.ops")
    torch.manual_seed(0)
    layer = CycleFC(5, 7, kernel).double()
    x = torch.randn(2, 5, *size, dtype=torch.float64)
    offset = cycle_offsets(5, kernel).double().reshape(1, 10, 1, 1).expand(2, 10, *size)  # (dy, dx) per input channel
    reference = ops.deform_conv2d(x, offset.contiguous(), layer.weight[:, :, None, None], layer.bias)
    torch.testing.assert_close(layer(x), reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("channels,heads,size", [(6, 3, (3, 5)), (8, 2, (4, 4)), (5, 1, (1, 3))])
def test_factor_attention_is_its_formula(channels, heads, size):
    torch.manual_seed(0)
    attn = FactorAttention(channels, heads).double()
    x = torch.randn(2, channels, *size, dtype=torch.float64)
    qkv = torch.einsum("oc,bchw->bohw", attn.qkv.weight[:, :, 0, 0], x) + attn.qkv.bias[:, None, None]
    q, k, v = qkv.split(channels, 1)
    d, N = channels // heads, size[0] * size[1]
    out = torch.empty_like(x)
    for h in range(heads):
        part = slice(h * d, (h + 1) * d)
        qh, kh, vh = (t[:, part].reshape(2, d, N) for t in (q, k, v))  # [B, d, N]
        weights = torch.exp(kh) / torch.exp(kh).sum(-1, keepdim=True)  # softmax over the N positions
        context = torch.einsum("bin,bjn->bij", weights, vh)  # [B, d (key), d (value)]
        out[:, part] = (torch.einsum("bin,bij->bjn", qh, context) / d**0.5).reshape(2, d, *size)
    rel = torch.nn.functional.conv2d(v, attn.rel_pos.weight, attn.rel_pos.bias, padding=1, groups=channels)
    expected = torch.einsum("oc,bchw->bohw", attn.proj.weight[:, :, 0, 0], out + q * rel) + attn.proj.bias[:, None, None]
    torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("block", [lambda c: CycleMLPBlock(c), lambda c: MPViTBlock(c, num_heads=2), lambda c: MPViTBlock(c, num_paths=1, num_heads=1)])
@pytest.mark.parametrize("grid", [1, 3, 5])
def test_cube_blocks_keep_shape_and_treat_patches_independently(block, grid):
    torch.manual_seed(0)
    module = block(6).eval()
    x = torch.randn(3, 6, grid, grid)
    out = module(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(module(x[1:2]), out[1:2], rtol=1e-5, atol=1e-6)  # no batch statistics
    module.train()
    module(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


def test_mpvit_paths_see_growing_neighbourhoods():
    """Path i's embedding stacks i depthwise 3 x 3 convolutions: a pixel reaches i rings around it."""
    torch.manual_seed(0)
    block = MPViTBlock(4, num_paths=3, num_heads=1).eval()
    x = torch.randn(1, 4, 11, 11)
    moved = x.clone()
    moved[..., 5, 5] += 3.0  # change one pixel
    e, e_moved = x, moved
    with torch.no_grad():
        for i, embed in enumerate(block.embed, start=1):
            e, e_moved = embed(e), embed(e_moved)
            reached = (e - e_moved).abs().sum(1)[0] > 1e-6  # [11, 11]
            inside = torch.zeros(11, 11, dtype=torch.bool)
            inside[5 - i:6 + i, 5 - i:6 + i] = True
            assert reached[inside].all() and not reached[~inside].any(), i


@pytest.mark.parametrize("name", ["vit-mb", "vit-cyclemlp", "vit-mpvit"])
def test_local_baselines_read_local_cubes_only(name):
    torch.manual_seed(0)
    grid, d = 3, 10
    model = create_model(name, d=d, local_grid=grid, n_outputs=2, channels=6, n_blocks=2, embed_dim=8, depth=1, num_heads=2).eval()
    features, local = torch.randn(2, 5, d), torch.randn(2, 5, grid, grid, d)
    coords, mask = torch.randint(0, 5000, (2, 5, 2)), torch.ones(2, 5, dtype=torch.bool)
    out = model(features, local, coords, mask)
    assert out.shape == (2, 2)
    torch.testing.assert_close(model(features + 5.0, local, coords, mask), out)  # global features play no part
    assert not torch.allclose(model(features, local.flip(2), coords, mask), out)  # the cube does
    with pytest.raises(ValueError, match="local"):
        model(features, None, coords, mask)
    assert model.uses_local and len(model.blocks) == 2


def test_mlp_probe_is_an_mlp_on_the_masked_mean():
    torch.manual_seed(0)
    probe = create_model("mlp-probe", d=7, n_outputs=3, hidden=5).eval()
    features = torch.randn(2, 4, 7)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    expected = torch.stack([probe.mlp(probe.norm(features[0, :2].mean(0))), probe.mlp(probe.norm(features[1].mean(0)))])
    torch.testing.assert_close(probe(features, mask), expected)
    assert not probe.uses_local and probe.batch_inputs == ("features", "mask")
    with pytest.raises(ValueError, match="features"):
        probe(features[..., :3], mask)
