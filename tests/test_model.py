"""Dual Attention network (isg.model): shapes per equation, padding, chunking, ISG-N-k, training, checkpoints."""

from __future__ import annotations

import os

import pytest
import torch

from isg.model import (DualAttentionNet, FusionBlock, GlobalUpdater, GlobalUpdaterPlus, GlobalViT, LocalUpdater,
                       LocalUpdaterPlus, MBConv, create_model, list_models, load_model, parse_model_name, save_model)
from isg.model import dual_attention
from isg.ops import attention as ops
from isg.model.vit import normalize_coords, sincos_pos_embed_2d

@pytest.fixture(scope="session")
def attention_ext(require_ext):
    """The native module with the attention kernels (skipped for an older build, failed under ISG_REQUIRE_EXT=1)."""
    from isg import _ext

    if not _ext.has("gated_hadamard_forward_cpu"):
        if os.environ.get("ISG_REQUIRE_EXT") == "1":
            pytest.fail("isg._C was built without the attention kernels")
        pytest.skip("isg._C was built without the attention kernels")
    return require_ext


D_IN, GRID = 12, 3  # odd cube side on purpose
SMALL = dict(embed_dim=16, depth=1, num_heads=2)  # every model
SMALL_ISG = dict(SMALL, channels=8)  # ISG models only
LOCAL_BASELINES = ("vit-mb", "vit-cyclemlp", "vit-mpvit")  # ViT-S fed local cubes through blocks (paper Tab. 1)


def _small(name):
    if name == "he2rna":
        return {"hidden": (8,), "ks": (1, 2)}
    if name == "mlp-probe":
        return {"hidden": 64}
    if name in LOCAL_BASELINES:
        return dict(SMALL_ISG, n_blocks=2)
    return SMALL if name.startswith("vit") else SMALL_ISG


def _bag(n, d=D_IN, grid=GRID, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"features": torch.randn(n, d, generator=g), "local": torch.randn(n, grid, grid, d, generator=g),
            "coords": torch.randint(0, 20000, (n, 2), generator=g)}


def _collate(bags):
    n_max = max(len(b["features"]) for b in bags)
    out = {"mask": torch.zeros(len(bags), n_max, dtype=torch.bool)}
    for key in ("features", "local", "coords"):
        first = bags[0][key]
        out[key] = first.new_zeros((len(bags), n_max, *first.shape[1:]))
        for i, bag in enumerate(bags):
            out[key][i, : len(bag[key])] = bag[key]
    for i, bag in enumerate(bags):
        out["mask"][i, : len(bag["features"])] = True
    return out


def _model(name="isg-4-2", n_outputs=3, **kw):
    torch.manual_seed(0)
    return create_model(name, d=D_IN, local_grid=GRID, n_outputs=n_outputs, **{**_small(name), **kw})


def _run(model, batch):
    inputs = {"features": batch["features"], "local_features": batch["local"], "coords": batch["coords"], "mask": batch["mask"]}
    return model(*(inputs[name] for name in model.batch_inputs))


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name,n,k,fusions", [("isg-10-2", 10, 2, 5), ("isg-4-2", 4, 2, 2), ("isg-5-2", 5, 2, 2),
                                              ("isg-6-3", 6, 3, 2), ("isg-1-1", 1, 1, 1), ("isg-3-3", 3, 3, 1)])
def test_isg_n_k_block_counts(name, n, k, fusions):
    model = create_model(name, d=D_IN, local_grid=GRID, n_outputs=2, **SMALL_ISG)
    assert parse_model_name(name) == (n, k)
    assert model.n_mbconv == n and model.n_fusion == fusions
    kinds = ["F" if isinstance(b, FusionBlock) else "M" for b in model.blocks]
    assert kinds == ((["M"] * k + ["F"]) * fusions + ["M"] * (n - k * fusions))
    assert sum(isinstance(m, MBConv) for m in model.modules()) == n


@pytest.mark.parametrize("channels,grid,batch", [(8, 4, 5), (5, 3, 2), (6, 1, 3), (7, 5, 1)])
def test_mbconv_channels_last_matches_its_nchw_reference(channels, grid, batch):
    torch.manual_seed(channels)
    block = MBConv(channels, drop_path=0.3).double()
    for p in block.parameters():  # LayerNorm weights start at 1 / 0: randomise so every term is exercised
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(batch, channels, grid, grid, dtype=torch.float64, requires_grad=True)
    for training in (False, True):
        block.train(training)
        outs, grads = [], []
        for forward in (block.forward, block.forward_reference):
            torch.manual_seed(1)  # the same stochastic-depth mask in training
            x.grad = None
            block.zero_grad()
            out = forward(x)
            (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
            outs.append(out)
            grads.append([x.grad.clone()] + [p.grad.clone() for p in block.parameters()])
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
        for fast, reference in zip(*grads):
            torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-12)
    assert block.channels_last and not MBConv(4, norm_layer=lambda c: torch.nn.GroupNorm(1, c)).channels_last


def test_registry_and_errors():
    assert "isg-10-2" in list_models() and "vit-s" in list_models()
    for name in list_models():
        model = create_model(name, d=D_IN, local_grid=GRID, n_outputs=2, **_small(name))
        assert model.config["name"] == name
    assert isinstance(create_model(d=D_IN, local_grid=GRID, n_outputs=1, **SMALL_ISG), DualAttentionNet)  # default isg-10-2
    with pytest.raises(ValueError, match="channels"):
        create_model("vit-s", d=D_IN, n_outputs=1, channels=8)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet", d=D_IN, local_grid=GRID, n_outputs=1)
    with pytest.raises(ValueError, match="N >= 1"):
        create_model("isg-2-3", d=D_IN, local_grid=GRID, n_outputs=1)
    with pytest.raises(ValueError, match="local_grid"):
        create_model("isg-4-2", d=D_IN, local_grid=None, n_outputs=1)
    model = _model()
    batch = _collate([_bag(4)])
    with pytest.raises(ValueError, match="local"):
        model(batch["features"], None, batch["coords"], batch["mask"])
    with pytest.raises(ValueError, match="local"):
        model(batch["features"], batch["local"][:, :, :2], batch["coords"], batch["mask"])
    with pytest.raises(ValueError, match="features"):
        model(batch["features"][..., :5], batch["local"], batch["coords"], batch["mask"])
    with pytest.raises(ValueError, match="mask"):
        model(batch["features"], batch["local"], batch["coords"], batch["mask"][:, :2])


# ----------------------------------------------------------------------------- shapes per equation


def test_local_updater_shapes(monkeypatch):
    M, C, D = 5, 8, 16
    seen = {}

    def spy(q, k, v, **kw):
        seen.update(q=q.shape, k=k.shape, v=v.shape)
        out = original(q, k, v)
        seen["a_v"] = out.shape
        return out

    original = dual_attention.gated_hadamard
    monkeypatch.setattr(dual_attention, "gated_hadamard", spy)
    updater = LocalUpdaterPlus(C, D)
    R = torch.randn(M, C, GRID, GRID)
    R_new = updater(torch.randn(M, D), R)
    L = GRID * GRID
    assert seen == {"q": (M, C, 1), "k": (M, C, L), "v": (M, C, L), "a_v": (M, C, L)}  # Eq. 3-5 (plus): Q, K, V, A (.) V
    assert R_new.shape == (M, C, GRID, GRID)  # R'


def test_global_updater_shapes(monkeypatch):
    M, C, D = 5, 8, 16
    seen = {}
    original = dual_attention.softmax_spatial_sum

    def spy(z, p, **kw):
        seen.update(z=z.shape, p=p.shape)
        out = original(z, p)
        seen["pooled"] = out.shape
        return out

    monkeypatch.setattr(dual_attention, "softmax_spatial_sum", spy)
    updater = GlobalUpdaterPlus(C, D, GRID)
    f_new = updater(torch.randn(M, D), torch.randn(M, C, GRID, GRID))
    L = GRID * GRID
    assert seen == {"z": (M, C, L), "p": (M, C, L), "pooled": (M, C)}  # Eq. 6-8 (plus): Z, P, sum_space(Z (.) P)
    assert f_new.shape == (M, D)  # f'
    with pytest.raises(ValueError, match="positions"):
        updater(torch.randn(M, D), torch.randn(M, C, GRID + 1, GRID + 1))


def test_softmax_weights_sum_to_one_over_space():
    updater = GlobalUpdaterPlus(4, 6, GRID)
    f = torch.randn(3, 6)
    z = updater.to_z(updater.norm_f(f)).view(3, 4, GRID * GRID)
    weights = torch.softmax(z, -1)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4))


def test_patch_and_slide_shapes():
    model = _model("isg-4-2", n_outputs=7)
    M = 6
    tokens = model.encode_patches(torch.randn(M, D_IN), torch.randn(M, GRID, GRID, D_IN))
    assert tokens.shape == (M, SMALL["embed_dim"])
    batch = _collate([_bag(4), _bag(6, seed=1)])
    assert _run(model, batch).shape == (2, 7)


def test_positional_encoding():
    coords = torch.tensor([[[100, 200], [300, 200], [100, 600], [0, 0]]])
    mask = torch.tensor([[True, True, True, False]])
    unit = normalize_coords(coords, mask)
    torch.testing.assert_close(unit[0, :3], torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.0, 1.0]]))
    assert (unit[0, 3] == 0).all()
    pos = sincos_pos_embed_2d(unit, 16)
    assert pos.shape == (1, 4, 16)
    assert not torch.allclose(pos[0, 0], pos[0, 1]) and not torch.allclose(pos[0, 0], pos[0, 2])
    # a shift of the whole slide changes nothing
    torch.testing.assert_close(normalize_coords(coords + 5000, mask)[0, :3], unit[0, :3])


# ----------------------------------------------------------------------------- variable-size bags


@pytest.mark.parametrize("name", ["isg-4-2", "isg-3-2", "vit-s", *LOCAL_BASELINES, "mlp-probe"])
def test_padding_gives_same_output_as_single_slides(name):
    model = _model(name).eval()
    bags = [_bag(5, seed=1), _bag(1, seed=2), _bag(8, seed=3), _bag(3, seed=4)]
    with torch.no_grad():
        batched = _run(model, _collate(bags))
        singles = torch.cat([_run(model, _collate([bag])) for bag in bags])
    torch.testing.assert_close(batched, singles, rtol=1e-4, atol=1e-5)


def test_padded_values_are_ignored():
    model = _model().eval()
    batch = _collate([_bag(3, seed=1), _bag(6, seed=2)])
    noisy = {k: v.clone() for k, v in batch.items()}
    noisy["features"][0, 3:] = 1e3
    noisy["local"][0, 3:] = -1e3
    noisy["coords"][0, 3:] = 10**7
    with torch.no_grad():
        torch.testing.assert_close(_run(model, batch), _run(model, noisy))


def test_chunking_does_not_change_output():
    model = _model(chunk_size=1024).eval()
    batch = _collate([_bag(5, seed=1), _bag(4, seed=2)])
    with torch.no_grad():
        whole = _run(model, batch)
        model.chunk_size = 2
        chunked = _run(model, batch)
    torch.testing.assert_close(whole, chunked, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, n, chunk", [("isg-4-2", 23, 7), ("isg-4-2-plus", 17, 4), ("isg-4-2", 9, 1)])
def test_float16_bags_run_a_chunk_at_a_time(name, n, chunk, monkeypatch):
    """A bag's local cubes stay float16 (as stored) and only a chunk of them is converted at a time: a 20k+
    patch bag never has its cubes copied whole; the output equals the float32 bag's."""
    model = _model(name, chunk_size=chunk).eval()
    bag = _bag(n, seed=4)
    bag["local"] = bag["local"].half()
    batch = _collate([bag])
    converted = []
    original = torch.Tensor.to

    def counted(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.dtype == torch.float16 and out.dtype == torch.float32:
            converted.append(len(self))
        return out

    with torch.no_grad():
        monkeypatch.setattr(torch.Tensor, "to", counted)
        half = _run(model, batch)
        monkeypatch.setattr(torch.Tensor, "to", original)
        full = _run(model, {**batch, "local": batch["local"].float()})
    torch.testing.assert_close(half, full, rtol=1e-5, atol=1e-6)
    assert converted and max(converted) <= chunk and sum(converted) == n


def test_empty_slide_in_batch():
    model = _model().eval()
    batch = _collate([_bag(3, seed=1), _bag(2, seed=2)])
    batch["mask"][1] = False
    with torch.no_grad():
        out = _run(model, batch)
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", ["isg-4-2", "isg-5-2", "isg-4-2-plus", *LOCAL_BASELINES, "mlp-probe"])
def test_forward_backward_reaches_every_parameter(name):
    model = _model(name).train()
    out = _run(model, _collate([_bag(5, seed=1), _bag(2, seed=2)]))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_gradient_checkpointing_gives_same_gradients():
    batch = _collate([_bag(5, seed=1), _bag(3, seed=2)])
    grads = []
    for flag in (False, True):
        model = _model(grad_checkpoint=flag, chunk_size=3)
        _run(model, batch).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["isg-2-1", "isg-2-1-plus", "vit-s", *LOCAL_BASELINES, "mlp-probe"])
def test_a_few_optimizer_steps_reduce_the_loss(name):
    """Synthetic task: targets are linear in the slide's mean global and local features."""
    torch.manual_seed(0)
    bags = [_bag(n, seed=s) for s, n in enumerate([4, 7, 3, 6, 5, 8, 2, 6])]
    batch = _collate(bags)
    w = torch.randn(D_IN, 2)
    model = _model(name, n_outputs=2)
    reads_global, reads_local = name not in LOCAL_BASELINES, model.uses_local  # the target uses what the model reads
    target = torch.stack([(b["features"].mean(0) * reads_global + b["local"].mean((0, 1, 2)) * reads_local) @ w for b in bags])
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.mse_loss(_run(model, batch), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_init_bias_sets_head():
    model = _model(n_outputs=3)
    model.init_bias(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(model.transformer.head.bias.data, torch.tensor([1.0, 2.0, 3.0]))


# ----------------------------------------------------------------------------- fused ops inside the model


@pytest.mark.parametrize("name", ["isg-4-2", "isg-4-2-plus"])
def test_model_with_fused_ops_matches_reference(attention_ext, monkeypatch, name):
    model = _model(name)
    batch = _collate([_bag(4, seed=1), _bag(6, seed=2)])
    fused_out = _run(model, batch)
    fused_out.sum().backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(dual_attention, "gated_hadamard", ops.gated_hadamard_reference)
    monkeypatch.setattr(dual_attention, "softmax_spatial_sum", ops.softmax_spatial_sum_reference)
    ref_out = _run(model, batch)
    ref_out.sum().backward()
    torch.testing.assert_close(fused_out, ref_out, rtol=1e-4, atol=1e-5)
    for g_fused, p in zip(fused_grads, model.parameters()):
        torch.testing.assert_close(g_fused, p.grad, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", ["isg-3-2", "vit-s", "vit-mpvit", "mlp-probe"])
def test_save_and_load_rebuild_the_model(tmp_path, name):
    model = _model(name, n_outputs=4, **({} if name == "mlp-probe" else {"drop_path": 0.1})).eval()
    path = tmp_path / "sub" / "model.pt"
    save_model(path, model, epoch=3)
    loaded = load_model(path)
    assert loaded.config == model.config and not loaded.training
    assert type(loaded) is type(model)
    batch = _collate([_bag(4, seed=1), _bag(2, seed=2)])
    with torch.no_grad():
        torch.testing.assert_close(_run(loaded, batch), _run(model, batch))
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left behind
    assert load_model(path).extra["epoch"] == 3


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(ValueError, match="bad.pt"):
        load_model(bad)
    plain = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="config"):
        save_model(tmp_path / "plain.pt", plain)
    assert isinstance(create_model("vit-s", d=D_IN, n_outputs=2, **SMALL), GlobalViT)


# ----------------------------------------------------------------------------- the paper's equations, literally


@pytest.mark.parametrize("S", [2, 3, 4, 8])
def test_fusion_block_is_eqs_3_to_8(S):
    """Eqs. 3-8 computed with einsum from the block's own weights (fp64): both updaters read f^{t-1}, R^{t-1}."""
    M, C, D, L = 5, 6, 7, S * S
    torch.manual_seed(S)
    block = FusionBlock(C, D, S).double()
    for p in block.parameters():  # spread the weights so every term matters
        torch.nn.init.normal_(p, std=0.5)
    f, R = torch.randn(M, D, dtype=torch.float64), torch.randn(M, C, S, S, dtype=torch.float64)
    f_new, R_new = block(f, R)

    lu, gu = block.local_updater, block.global_updater
    W = lambda conv: conv.weight[:, :, 0, 0]  # noqa: E731  1x1 conv [C_out, C_in]: R W has rows R_l W^T
    rows = R.flatten(2).transpose(1, 2)  # R as L rows of C channels: [M, L, C]
    Q = torch.einsum("ld,md->ml", lu.to_q.weight, f)  # Eq. 3: Reshape(W_q f), one logit per position [M, L]
    K = torch.einsum("mlc,oc->mlo", rows, W(lu.to_k))  # R W_k [M, L, C]
    V = torch.einsum("mlc,oc->mlo", rows, W(lu.to_v))  # R W_v
    A = torch.sigmoid(Q[:, :, None] * K)  # Eq. 4: Q broadcast over channels
    R_ref = torch.einsum("mlc,oc->mlo", A * V, W(lu.proj))  # Eq. 5: (A (.) V) W_r
    Z = torch.softmax(torch.einsum("ld,md->ml", gu.to_z.weight, f), dim=1)  # Eq. 6: softmax over the L positions
    P = torch.einsum("mlc,oc->mlo", rows, W(gu.to_p))  # Eq. 7: R W_p
    f_ref = torch.einsum("mc,dc->md", (Z[:, :, None] * P).sum(1), gu.proj.weight)  # Eq. 8: Sum(Z (.) P) W_f

    torch.testing.assert_close(R_new, R_ref.transpose(1, 2).reshape(M, C, S, S), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(f_new, f_ref, rtol=1e-6, atol=1e-6)
    assert tuple(lu.to_q.weight.shape) == (L, D) and tuple(gu.to_z.weight.shape) == (L, D)  # W_q, W_z in R^{L x d}


def test_paper_and_plus_forms_are_different_models():
    paper, plus = _model("isg-4-2"), _model("isg-4-2-plus")
    assert not paper.plus and plus.plus
    fusions = [b for b in paper.blocks if isinstance(b, FusionBlock)]
    assert [b.global_updater is None for b in fusions] == [False, True]  # f after the last fusion feeds nothing
    assert type(fusions[0].local_updater) is LocalUpdater and type(fusions[0].global_updater) is GlobalUpdater
    assert all(isinstance(b.local_updater, LocalUpdaterPlus) for b in plus.blocks if isinstance(b, FusionBlock))
    # paper tokens are the pooled cubes alone: f after the stem changes the tokens only through the fusion blocks
    f, R = torch.randn(3, D_IN), torch.randn(3, GRID, GRID, D_IN)
    expected_local = paper.stem_local(R).permute(0, 3, 1, 2)
    fh = paper.stem_global(f)
    for block in paper.blocks:
        fh, expected_local = block(fh, expected_local) if isinstance(block, FusionBlock) else (fh, block(expected_local))
    expected = paper.token_proj(paper.token_norm(expected_local.mean((2, 3))))
    torch.testing.assert_close(paper.encode_patches(f, R), expected)


def test_registry_names_and_declarations():
    assert {"isg-10-2", "isg-10-2-plus", "vit-s", "vit-t4", "he2rna"} <= set(list_models())
    assert list_models("vit-*") == ["vit-cyclemlp", "vit-mb", "vit-mpvit", "vit-s", "vit-t4"]
    vit_s, vit_t4 = create_model("vit-s", d=D_IN, n_outputs=2), create_model("vit-t4", d=D_IN, n_outputs=2)
    assert (vit_s.transformer.head.in_features, len(vit_s.transformer.blocks), vit_s.transformer.blocks[0].attn.num_heads) == (384, 12, 6)
    assert (vit_t4.transformer.head.in_features, len(vit_t4.transformer.blocks), vit_t4.transformer.blocks[0].attn.num_heads) == (192, 4, 4)
    assert parse_model_name("isg-7-3-plus") == (7, 3)
    assert isinstance(create_model("isg-7-3-plus", d=D_IN, local_grid=GRID, **SMALL_ISG), DualAttentionNet)
    for name, uses_local in (("isg-2-1", True), ("isg-2-1-plus", True), ("vit-s", False), ("he2rna", False),
                             ("vit-mb", True), ("vit-mpvit", True), ("mlp-probe", False)):
        model = create_model(name, d=D_IN, local_grid=GRID, n_outputs=2, **_small(name))
        assert model.uses_local is uses_local and "features" in model.batch_inputs


def test_default_model_has_one_definition():
    import inspect

    from isg.model import DEFAULT_MODEL
    from isg.train.config import TrainConfig

    assert DEFAULT_MODEL == "isg-10-2" == TrainConfig.model
    assert inspect.signature(create_model).parameters["name"].default == DEFAULT_MODEL


# ----------------------------------------------------------------------------- explain


@pytest.mark.parametrize("name", ["isg-4-2", "isg-4-2-plus", "vit-s"])
def test_explain_per_patch_views(name):
    model = _model(name, n_outputs=3).eval()
    bags = [_bag(5, seed=1), _bag(2, seed=2)]
    batch = _collate(bags)
    views = model.explain(batch["features"], batch["local"], batch["coords"], batch["mask"])
    assert views["patch_values"].shape == (2, 5, 3)
    assert (views["patch_values"][1, 2:] == 0).all()  # padded patches
    single = model.explain(*(_collate(bags[1:])[k] for k in ("features", "local", "coords", "mask")))
    torch.testing.assert_close(views["patch_values"][1, :2], single["patch_values"][0], rtol=1e-4, atol=1e-5)
    if hasattr(model, "chunk_size"):  # chunking changes no view
        model.chunk_size = 2
        chunked = model.explain(batch["features"], batch["local"], batch["coords"], batch["mask"])
        for key, value in views.items():
            torch.testing.assert_close(chunked[key], value, rtol=1e-5, atol=1e-6)
    if name.startswith("vit"):
        assert set(views) == {"patch_values"}
        return
    L = GRID * GRID
    n_global = 1 if name == "isg-4-2" else 2  # the paper form's last fusion block has no global updater
    assert views["local_gate"].shape == (2, 5, 2, L) and views["global_weights"].shape == (2, 5, n_global, L)
    gate = views["local_gate"][0]
    assert ((gate > 0) & (gate < 1)).all()
    torch.testing.assert_close(views["global_weights"][0].sum(-1), torch.ones(5, n_global))
    first = next(b for b in model.blocks if isinstance(b, FusionBlock)).global_updater
    with torch.no_grad():  # the first block's Z depends on the stem's f alone: a known answer
        z = first.weights(model.stem_global(batch["features"][0]), None)
    torch.testing.assert_close(views["global_weights"][0, :, 0], z)


def test_he2rna_patch_values_are_its_tile_scores():
    from isg.model import explain_batch, forward_batch

    model = create_model("he2rna", d=D_IN, n_outputs=3, hidden=(8,), ks=(2,)).eval()
    batch = _collate([_bag(5, seed=1), _bag(3, seed=2)])
    batch["local_features"] = batch.pop("local")
    values = explain_batch(model, batch)["patch_values"]  # [B, N, G]
    assert values.shape == (2, 5, 3) and (values[1, 3:] == 0).all()
    top2 = [values[b, : n].topk(2, dim=0).values.mean(0) for b, n in enumerate((5, 3))]  # the prediction: top-2 mean
    with torch.no_grad():
        torch.testing.assert_close(forward_batch(model, batch), torch.stack(top2))


# ----------------------------------------------------------------------------- safe loading and old formats


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("loader", ["fold_models", "model", "autoencoder"])
def test_a_pickle_that_runs_code_is_refused(tmp_path, loader):
    from isg.checkpoint import CheckpointError
    from isg.features import load_autoencoder
    from isg.model import load_fold_models

    marker = tmp_path / "owned"
    path = tmp_path / "run" / "model_fold0.pt"
    path.parent.mkdir()
    torch.save({"format": "isg-checkpoint", "version": 2, "state": _Evil(marker)}, path)
    load = {"fold_models": lambda: load_fold_models(path.parent), "model": lambda: load_model(path),
            "autoencoder": lambda: load_autoencoder(path)}[loader]
    with pytest.raises(CheckpointError, match="model_fold0.pt: refused"):
        load()
    assert not marker.exists()


def test_checkpoint_of_another_kind_or_version_is_refused(tmp_path):
    from isg.checkpoint import CheckpointError, save_checkpoint
    from isg.features import load_autoencoder

    model = _model("isg-2-1")
    save_model(tmp_path / "m.pt", model)
    with pytest.raises(CheckpointError, match="m.pt: holds a 'model' checkpoint, not 'autoencoder'"):
        load_autoencoder(tmp_path / "m.pt")
    save_checkpoint(tmp_path / "wrong.pt", "model", {**model.config, "channels": 4}, {"model": model.state_dict()})
    with pytest.raises(CheckpointError, match="wrong.pt: the stored model cannot be rebuilt"):
        load_model(tmp_path / "wrong.pt")
    torch.save({"format": "isg-checkpoint", "version": 99, "kind": "model"}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="future.pt: format version 99"):
        load_model(tmp_path / "future.pt")


def test_old_model_checkpoint_is_converted_with_a_warning(tmp_path):
    old = _model("isg-3-2-plus", n_outputs=2).eval()
    config = {**old.config, "name": "isg-3-2"}  # what isg-3-2 meant before the paper form took the name
    import re

    state = {re.sub(r"\.norm([123])\.", r".bn\1.", k): v for k, v in old.state_dict().items()}  # MBConv names before v2
    assert any(".bn1." in k for k in state)
    torch.save({"format": "isg-model/1", "config": config, "state_dict": state, "epoch": 4}, tmp_path / "old.pt")
    with pytest.warns(FutureWarning, match="old.pt: old checkpoint format 'isg-model/1'"):
        loaded = load_model(tmp_path / "old.pt")
    assert loaded.config["name"] == "isg-3-2-plus" and loaded.extra["epoch"] == 4
    batch = _collate([_bag(4, seed=1)])
    with torch.no_grad():
        torch.testing.assert_close(_run(loaded, batch), _run(old, batch))

    from isg.checkpoint import upgrade_checkpoint

    upgrade_checkpoint(tmp_path / "old.pt", "model")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_model(tmp_path / "old.pt").config["name"] == "isg-3-2-plus"
