"""HE2RNA baseline: top-k pooling, masking, bias init, training, ResNet loading, tissue tiles, super-tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from isg.baselines import HE2RNA, he2rna_features, load_resnet50, otsu_tissue_mask, supertiles, tissue_tile_coords, topk_mean

torchvision = pytest.importorskip("torchvision", reason="the HE2RNA baseline is optional: isg[he2rna]")


def test_topk_mean_known_answer():
    scores = torch.tensor([[[1.0, 5.0, 3.0, 2.0], [0.0, -1.0, -2.0, 4.0]]])  # [B=1, G=2, N=4]
    assert topk_mean(scores, None, 1).tolist() == [[5.0, 4.0]]
    assert topk_mean(scores, None, 2).tolist() == [[4.0, 2.0]]
    assert topk_mean(scores, None, 100).tolist() == [[2.75, 0.25]]  # k > N: all tiles
    mask = torch.tensor([[True, False, True, True]])  # tile 1 is padding
    assert topk_mean(scores, mask, 1).tolist() == [[3.0, 4.0]]
    assert topk_mean(scores, mask, 2).tolist() == [[2.5, 2.0]]
    torch.testing.assert_close(topk_mean(scores, mask, 5), torch.tensor([[2.0, 2.0 / 3.0]]))  # fewer real tiles than k


@pytest.mark.parametrize("batch,tiles,in_dim,genes", [(1, 1, 5, 1), (3, 7, 9, 4), (2, 130, 16, 3)])
def test_shapes_train_and_eval(batch, tiles, in_dim, genes):
    model = HE2RNA(in_dim, genes, hidden=(8, 6), ks=(1, 2, 5, 100))
    x = torch.randn(batch, tiles, in_dim)
    assert model.train()(x).shape == (batch, genes)
    assert model.eval()(x).shape == (batch, genes)
    assert model.tile_scores(x).shape == (batch, genes, tiles)


def test_inference_averages_ks_and_training_draws_one():
    torch.manual_seed(0)
    model = HE2RNA(6, 2, hidden=(5,), ks=(1, 3, 10), dropout=0.0)
    x = torch.randn(2, 8, 6)
    fixed = [model.eval()(x, k=k) for k in (1, 3, 10)]
    torch.testing.assert_close(model(x), torch.stack(fixed).mean(0))
    drawn = model.train()(x)
    assert any(torch.allclose(drawn, f) for f in fixed)


def test_bias_init_is_training_mean():
    mean = torch.tensor([0.5, 2.0, -1.0])
    model = HE2RNA(4, 3, bias_init=mean.numpy())
    torch.testing.assert_close(model.head.bias.detach(), mean)
    torch.nn.init.zeros_(model.head.weight)  # then every prediction is the bias
    torch.testing.assert_close(model.eval()(torch.randn(2, 5, 4)), mean.expand(2, 3))
    with pytest.raises(ValueError, match="2 values for 3 genes"):
        model.init_bias([1.0, 2.0])


def test_padded_tiles_are_ignored():
    torch.manual_seed(1)
    model = HE2RNA(6, 3, hidden=(8,), ks=(1, 2, 5)).eval()
    short = torch.randn(1, 4, 6)
    padded = torch.cat([short, 1e3 * torch.ones(1, 5, 6)], dim=1)  # padding with huge values
    mask = torch.tensor([[True] * 4 + [False] * 5])
    torch.testing.assert_close(model(padded, mask), model(short))
    both = torch.cat([padded, torch.randn(1, 9, 6)])  # the second bag uses all tiles
    out = model(both, torch.cat([mask, torch.ones(1, 9, dtype=torch.bool)]))
    torch.testing.assert_close(out[0:1], model(short))
    torch.testing.assert_close(out[1:2], model(both[1:2]))


def test_tiny_training_run_reduces_loss():
    torch.manual_seed(0)
    bags, tiles, dim, genes = 24, 12, 8, 3
    x = torch.randn(bags, tiles, dim)
    target = x.max(1).values[:, :genes] + 0.5  # [bags, genes]: a function of the top tiles
    model = HE2RNA(dim, genes, hidden=(32,), ks=(1, 2, 5), dropout=0.0, bias_init=target.mean(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(model.eval()(x), target).item()
    model.train()
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(model.eval()(x), target).item()
    assert after < 0.5 * before


# ----------------------------------------------------------------------------- ResNet


def test_resnet_from_hub_cache_and_explicit_path(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    cached = load_resnet50(arch="resnet18")
    assert cached.num_features == 512 and not cached.training
    torch.testing.assert_close(cached.conv1.weight, reference.conv1.weight)
    explicit = load_resnet50(tmp_path / "checkpoints" / "resnet18-f37072fd.pth", arch="resnet18")
    torch.testing.assert_close(explicit.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)

    reference.fc = torch.nn.Identity()
    tiles = torch.randint(0, 256, (3, 40, 48, 3), dtype=torch.uint8)
    x = tiles.permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference.eval()(x)
    torch.testing.assert_close(he2rna_features(tiles, cached), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(he2rna_features(tiles.numpy(), cached, batch_size=2), expected, rtol=1e-4, atol=1e-4)


def test_resnet_errors_and_random_weights_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.warns(UserWarning, match="RANDOM weights"):
        backbone = load_resnet50()
    assert he2rna_features(torch.zeros(1, 32, 32, 3, dtype=torch.uint8), backbone).shape == (1, 2048)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_resnet50(tmp_path / "missing.pth", arch="resnet18")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"wrong\.pth: not a torchvision resnet18 state dict"):
        load_resnet50(tmp_path / "wrong.pth", arch="resnet18")
    with pytest.raises(ValueError, match="arch must be one of"):
        load_resnet50(arch="vit")
    with pytest.raises(ValueError, match=r"uint8 \[B, H, W, 3\]"):
        he2rna_features(torch.zeros(1, 3, 32, 32), backbone)


# ----------------------------------------------------------------------------- tissue and super-tiles


def test_otsu_mask_and_tile_grid():
    thumbnail = np.full((60, 90, 3), 240, np.uint8)  # white glass
    thumbnail[10:40, 20:50] = (150, 60, 120)  # a block of stained tissue
    mask = otsu_tissue_mask(thumbnail)
    assert mask.sum() == 30 * 30 and mask[10:40, 20:50].all()
    assert not otsu_tissue_mask(np.full((8, 8, 3), 255, np.uint8)).any()
    # mask at 11.2 um/px: a 224 px tile at 0.5 um/px spans 10 x 10 mask pixels
    coords = tissue_tile_coords(mask, mask_mpp=11.2)
    expected = [(x * 224, y * 224) for y in (1, 2, 3) for x in (2, 3, 4)]
    assert sorted(map(tuple, coords.tolist())) == sorted(expected)
    assert len(tissue_tile_coords(mask, mask_mpp=11.2, min_tissue=1.01)) == 0
    assert tissue_tile_coords(mask[:5, :5], mask_mpp=11.2).shape == (0, 2)


def test_supertiles_average_spatial_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [5000, 0], [0, 5000]])
    coords = np.concatenate([c + rng.normal(scale=50, size=(n, 2)) for c, n in zip(centers, (10, 7, 13))])
    features = torch.randn(30, 5)
    pooled, pooled_coords, labels = supertiles(coords, features, n_clusters=3)
    assert pooled.shape == (3, 5) and pooled_coords.shape == (3, 2) and labels.shape == (30,)
    for start, stop in ((0, 10), (10, 17), (17, 30)):
        assert len(set(labels[start:stop].tolist())) == 1
        c = int(labels[start])
        torch.testing.assert_close(pooled[c], features[start:stop].mean(0))
        np.testing.assert_allclose(pooled_coords[c].numpy(), coords[start:stop].mean(0), rtol=1e-5)
    same, same_coords, same_labels = supertiles(coords[:4], features[:4], n_clusters=10)
    assert torch.equal(same, features[:4]) and same_labels.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="coords must be"):
        supertiles(coords[:, :1], features, 3)


# ----------------------------------------------------------------------------- HE2RNA-Shannon


def test_he2rna_shannon_scores_tiles_and_keeps_the_selected_ones(tmp_path):
    from isg.pipeline.he2rna import he2rna_predict_slide, he2rna_slide_features, he2rna_tile_grid, he2rna_tile_scores
    from isg.io import open_slide
    from isg.io.synth import make_cohort
    from isg.ops.shannon import shannon_bits
    from isg.select import SelectionRule, select

    slide_path = make_cohort(tmp_path, n_slides=1, size=1024, genes=3, seed=5).slides[0]
    with pytest.warns(UserWarning, match="RANDOM weights"):
        backbone = load_resnet50(arch="resnet18")
    model = HE2RNA(backbone.num_features, 3, hidden=(8,), ks=(1, 3)).eval()
    rule = SelectionRule("mean_std", n_sigma=0.5)
    with open_slide(slide_path) as slide:
        grid = he2rna_tile_grid(slide)
        assert grid.size == 224 and len(grid.coords) >= 4  # 0.5 um/px slide: tiles read at 224 px, no resize
        tiles = np.stack([slide.read_region(tuple(c), grid.level, (grid.size, grid.size)) for c in grid.coords])
        scores = he2rna_tile_scores(slide, grid, batch_size=3)
        np.testing.assert_allclose(scores, shannon_bits(tiles))  # grid order, whatever the batch size
        keep = select(scores, rule).keep
        assert 0 < keep.sum() < len(keep)
        prediction, timings = he2rna_predict_slide(slide, backbone, model, selection=rule, batch_size=4)
        everything, _ = he2rna_predict_slide(slide, backbone, model, batch_size=4)
        features, coords = he2rna_slide_features(slide, backbone, grid.subset(keep))
    assert timings["n_tiles"] == keep.sum() and timings["n_scored"] == len(keep)
    np.testing.assert_array_equal(coords, grid.coords[keep])
    with torch.no_grad():
        expected = model(he2rna_features(tiles[keep], backbone)[None])[0].numpy()
    np.testing.assert_allclose(prediction, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(prediction, everything)  # a different bag of tiles
