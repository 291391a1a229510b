"""StyleGAN2 autoencoder, LPIPS loader and autoencoder training (isg.features, isg.train.autoencoder)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from isg.features import Autoencoder, load_autoencoder, modulated_conv2d, save_autoencoder, tiles_to_input
from isg.features.lpips_loss import ALEXNET_FILE, load_lpips

TINY = dict(channel_base=128, channel_max=16, mapping_layers=1)


@pytest.fixture(autouse=True)
def _one_thread():
    """The networks here are tiny: intra-op threading only adds synchronisation (badly so on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _empty_hub(tmp_path, monkeypatch):
    """No cached AlexNet weights and no network: any download attempt fails the test."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_download(*args, **kwargs):
        raise AssertionError("attempted a download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)


def smooth_tiles(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, size, size, 3] smooth colour patterns (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    tiles = []
    for _ in range(n):
        f, phase = rng.uniform(1, 4, 3), rng.uniform(0, 6, 3)
        tiles.append(np.stack([127 + 110 * np.sin(2 * f[c] * xx + phase[c]) * np.cos(3 * f[c] * yy) for c in range(3)], -1))
    return torch.from_numpy(np.stack(tiles).round().astype(np.uint8))


# ----------------------------------------------------------------------------- networks


@pytest.mark.parametrize("resolution,d,batch", [(8, 5, 1), (16, 7, 3), (32, 12, 2)])
def test_encoder_decoder_discriminator_shapes(resolution, d, batch):
    ae = Autoencoder(resolution, d, **TINY)
    x = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    code = ae.encode(x)
    assert code.shape == (batch, d)
    assert ae.decode(code).shape == (batch, 3, resolution, resolution)
    assert ae(x).shape == (batch, 3, resolution, resolution)
    assert ae.make_discriminator()(x).shape == (batch,)
    assert (ae.resolution, ae.d) == (resolution, d) and ae.config["resolution"] == resolution
    with pytest.raises(ValueError, match=f"expected images \\[B, 3, {resolution}, {resolution}\\]"):
        ae.encode(torch.zeros(batch, 3, resolution + 1, resolution + 1))


def test_bad_resolution():
    with pytest.raises(ValueError, match="power of two"):
        Autoencoder(24, 8, **TINY)


def test_noise_modes():
    ae = Autoencoder(16, 6, **TINY)
    for block in ae.decoder.blocks:  # make the noise visible
        for layer in (getattr(block, "conv0", None), block.conv1):
            if layer is not None:
                layer.noise_strength.data.fill_(0.5)
    code = torch.randn(2, 6)
    const = ae.decode(code, noise_mode="const")
    assert torch.equal(const, ae.decode(code, noise_mode="const"))
    assert not torch.allclose(ae.decode(code, noise_mode="random"), ae.decode(code, noise_mode="random"))
    assert not torch.allclose(const, ae.decode(code, noise_mode="none"))


def test_modulated_conv_matches_per_sample_conv():
    torch.manual_seed(0)
    x, weight, styles = torch.randn(3, 5, 9, 7), torch.randn(4, 5, 3, 3), torch.rand(3, 5) + 0.5
    out = modulated_conv2d(x, weight, styles, demodulate=True, padding=1)
    for b in range(3):
        w = weight * styles[b].reshape(1, 5, 1, 1)
        w = w / w.square().sum(dim=(1, 2, 3), keepdim=True).sqrt()
        torch.testing.assert_close(out[b], F.conv2d(x[b:b + 1], w, padding=1)[0], rtol=1e-5, atol=1e-5)


def test_demodulation_keeps_unit_variance():
    """Known answer: demodulated filters have unit norm, so i.i.d. N(0, 1) input gives unit-variance output."""
    torch.manual_seed(0)
    x = torch.randn(4, 64, 40, 40)
    weight = torch.randn(32, 64, 3, 3)
    styles = torch.randn(4, 64).exp()  # arbitrary positive scales per sample and channel
    out = modulated_conv2d(x, weight, styles, demodulate=True)  # valid conv: no padding effects
    assert out.shape == (4, 32, 38, 38)
    per_channel_var = out.var(dim=(2, 3))  # [B, O]
    assert per_channel_var.mean().item() == pytest.approx(1.0, abs=0.03)
    assert ((per_channel_var - 1).abs() < 0.15).all()
    raw = modulated_conv2d(x, weight, styles, demodulate=False)
    assert raw.var().item() > 10  # without demodulation the variance follows the weights and styles


def test_tiles_to_input():
    tiles = torch.tensor([[[[0, 255, 128]]]], dtype=torch.uint8).expand(2, 6, 6, 3).contiguous()
    x = tiles_to_input(tiles, 8)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, :, 3, 3], torch.tensor([[-1.0, 1.0, 128 / 127.5 - 1]] * 2))
    with pytest.raises(ValueError, match="uint8 RGB"):
        tiles_to_input(torch.zeros(2, 6, 6, 4, dtype=torch.uint8), 8)


def test_save_load_roundtrip(tmp_path):
    ae = Autoencoder(16, 9, **TINY).eval()
    save_autoencoder(tmp_path / "ae.pt", ae, extra={"note": "x"})
    loaded = load_autoencoder(tmp_path / "ae.pt")
    assert loaded.config == ae.config and loaded.extra == {"note": "x"} and not loaded.training
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), ae.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded(x, noise_mode="const"), ae(x, noise_mode="const"), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["ae.pt"]  # atomic write leaves no temp file


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_autoencoder(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_autoencoder(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not an isg autoencoder"):
        load_autoencoder(tmp_path / "other.pt")


# ----------------------------------------------------------------------------- LPIPS


def test_lpips_without_weights_warns_and_runs():
    with pytest.warns(UserWarning, match="RANDOM"):
        loss = load_lpips()
    assert not loss.pretrained_backbone
    x = torch.rand(3, 3, 16, 16) * 2 - 1  # below AlexNet's minimum: up-sampled internally
    d_same, d_other = loss(x, x), loss(x, -x)
    assert d_same.shape == (3,) and torch.equal(d_same, torch.zeros(3))
    assert (d_other > 0).all()
    assert not any(p.requires_grad for p in loss.parameters())
    y = x.clone().requires_grad_()
    loss(y, -x).sum().backward()  # gradients flow to the input
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_lpips_loads_backbone_from_hub_cache_or_path(tmp_path):
    torchvision = pytest.importorskip("torchvision")  # optional (isg[he2rna]): only to make a reference state dict

    alexnet = torchvision.models.alexnet(weights=None)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(alexnet.state_dict(), cache / ALEXNET_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "random backbone" warning
        loss = load_lpips()
    assert loss.pretrained_backbone
    torch.testing.assert_close(loss.features[6].weight, alexnet.features[6].weight, rtol=0, atol=0)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        load_lpips(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_lpips(tmp_path / "nothere.pth")


# ----------------------------------------------------------------------------- training


TRAIN = dict(resolution=16, d=16, channel_base=128, channel_max=16, mapping_layers=1, batch_size=6, lr=2e-3, progress=False,
             checkpoint_every=0, r1_interval=4, lpips_without_weights="random")  # every term of Eq. 2, even without weights


def test_training_reduces_reconstruction_loss(tmp_path):
    from isg.train.autoencoder import train_autoencoder

    tiles = smooth_tiles(6, 20)
    with pytest.warns(UserWarning, match="RANDOM"):
        ae, history = train_autoencoder(tiles, tmp_path, dict(TRAIN, max_steps=30))
    assert history["step"] == list(range(30))
    assert all(len(history[k]) == 30 for k in ("l1", "lpips", "adv", "d_loss", "r1"))
    l1 = np.array(history["l1"])
    assert np.isfinite(l1).all() and np.isfinite(history["d_loss"]).all()
    assert l1[-5:].mean() < 0.8 * l1[:5].mean(), l1
    assert history["r1"][0] > 0 and history["lpips"][0] > 0  # every term of Eq. 2 is active
    assert {p.name for p in tmp_path.iterdir()} >= {"checkpoint.pt", "autoencoder.pt", "history.json"}
    exported = load_autoencoder(tmp_path / "autoencoder.pt")
    x = tiles_to_input(tiles, 16)
    with torch.no_grad():
        torch.testing.assert_close(exported.encode(x), ae.encode(x), rtol=0, atol=0)


def test_resume_matches_uninterrupted_run(tmp_path):
    from isg.train.autoencoder import train_autoencoder

    tiles = smooth_tiles(5, 16, seed=1)
    warnings.simplefilter("ignore", UserWarning)
    straight, h_straight = train_autoencoder(tiles, tmp_path / "a", dict(TRAIN, max_steps=6))
    train_autoencoder(tiles, tmp_path / "b", dict(TRAIN, max_steps=3))
    resumed, h_resumed = train_autoencoder(tiles, tmp_path / "b", dict(TRAIN, max_steps=6))
    assert h_resumed == h_straight
    x = tiles_to_input(tiles, 16)
    with torch.no_grad():
        torch.testing.assert_close(resumed.encode(x), straight.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(resumed(x, noise_mode="const"), straight(x, noise_mode="const"), rtol=0, atol=0)
    # the training checkpoint is also a valid autoencoder checkpoint (encoder + EMA decoder)
    with torch.no_grad():
        torch.testing.assert_close(load_autoencoder(tmp_path / "b" / "checkpoint.pt").encode(x), straight.encode(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="different model"):
        train_autoencoder(tiles, tmp_path / "b", dict(TRAIN, d=8, max_steps=7))


def test_training_rejects_bad_inputs(tmp_path):
    from isg.train.autoencoder import train_autoencoder

    with pytest.raises(ValueError, match="uint8 RGB tiles"):
        train_autoencoder(torch.zeros(4, 8, 8, 3), tmp_path, dict(TRAIN, max_steps=1))
    with pytest.raises(ValueError, match="unknown autoencoder training option"):
        train_autoencoder(smooth_tiles(2, 8), tmp_path, dict(TRAIN, epochz=3))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        train_autoencoder(tmp_path / "missing", tmp_path, dict(TRAIN, max_steps=1))


def test_training_reports_progress_per_step(tmp_path):
    from isg.train.autoencoder import AutoencoderProgress, train_autoencoder

    reports = []
    with pytest.warns(UserWarning, match="RANDOM"):
        _, history = train_autoencoder(smooth_tiles(4, 16), tmp_path, dict(TRAIN, max_steps=4), progress=reports.append)
    assert [r.step for r in reports] == [1, 2, 3, 4] and all(isinstance(r, AutoencoderProgress) for r in reports)
    assert all(r.steps == 4 and r.kind == "global" for r in reports) and reports[-1].seconds_left == 0
    assert [r.losses["l1"] for r in reports] == history["l1"] and set(reports[0].losses) == {"l1", "lpips", "adv", "d_loss", "r1"}


def test_resolution_defaults_per_kind():
    from isg.train.config import AutoencoderTrainConfig

    assert AutoencoderTrainConfig().resolution == AutoencoderTrainConfig.GLOBAL_RESOLUTION == 64
    assert AutoencoderTrainConfig(kind="local").resolution == AutoencoderTrainConfig.LOCAL_RESOLUTION == 32
    assert AutoencoderTrainConfig(kind="local", resolution=16).resolution == 16
    with pytest.raises(ValueError, match="kind"):
        AutoencoderTrainConfig(kind="other")


def test_old_autoencoder_checkpoint_is_converted(tmp_path):
    ae = Autoencoder(16, 9, **TINY).eval()
    torch.save({"format": "isg-autoencoder-v1", "config": dict(ae.config), "state_dict": ae.state_dict(), "extra": {"note": "x"}},
               tmp_path / "old.pt")
    with pytest.warns(FutureWarning, match="old.pt: old checkpoint format 'isg-autoencoder-v1'"):
        loaded = load_autoencoder(tmp_path / "old.pt")
    assert loaded.extra == {"note": "x"}
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), ae.encode(x), rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_mixed_precision_training(tmp_path):
    from isg.train.autoencoder import train_autoencoder

    tiles = smooth_tiles(8, 32)
    ae, history = train_autoencoder(tiles, tmp_path, dict(TRAIN, resolution=32, max_steps=20, device="cuda", amp=True))
    assert np.isfinite(history["l1"]).all() and np.isfinite(history["d_loss"]).all()
    assert np.mean(history["l1"][-5:]) < np.mean(history["l1"][:5])
    x = tiles_to_input(tiles, 32)
    with torch.no_grad():  # the exported model gives the same codes on CPU and GPU
        cpu = load_autoencoder(tmp_path / "autoencoder.pt").encode(x)
        torch.testing.assert_close(ae.encode(x.cuda()).cpu(), cpu, rtol=1e-2, atol=1e-2)  # cuDNN may use TF32


@pytest.mark.parametrize("policy,terms,backbone", [("random", "l1 + lpips + adv", "random"), ("off", "l1 + adv", "none")])
def test_checkpoint_records_loss_terms_and_lpips_backbone(tmp_path, monkeypatch, policy, terms, backbone):
    """Without ImageNet AlexNet weights the policy decides the LPIPS term; the checkpoint, the returned model
    and the feature attrs say which terms trained it and whether the backbone was pretrained."""
    from isg.pipeline.extract import encoder_attrs
    from isg.train.autoencoder import train_autoencoder

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))  # no weights in the cache
    with pytest.warns(UserWarning, match="RANDOM" if policy == "random" else "LPIPS term is off"):
        ae, history = train_autoencoder(smooth_tiles(4, 16), tmp_path / "ae", dict(TRAIN, max_steps=2, lpips_without_weights=policy))
    assert (max(history["lpips"]) > 0) == (policy == "random")
    for extra in (ae.extra, load_autoencoder(tmp_path / "ae" / "autoencoder.pt").extra):
        assert extra["objective"]["loss_terms"] == terms and extra["objective"]["lpips_backbone"] == backbone
        assert extra["objective"]["extractor_size"] == "compact (r 16, d 16, <= 16 ch)"
    attrs = encoder_attrs(ae, "global")
    assert attrs["loss_terms"] == terms and attrs["lpips_backbone"] == backbone and attrs["checkpoint"].endswith("autoencoder.pt")
    with pytest.raises(ValueError, match="lpips_without_weights"):
        train_autoencoder(smooth_tiles(2, 16), tmp_path / "x", dict(TRAIN, max_steps=1, lpips_without_weights="maybe"))
