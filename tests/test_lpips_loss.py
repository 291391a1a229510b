"""isg's own LPIPS(AlexNet) against the reference ``lpips`` package (when installed)."""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch

from isg.features.lpips_loss import ALEXNET_FILE, LINEAR_WEIGHTS, load_lpips


def test_linear_weights_are_lpips_v01_alex():
    digest = hashlib.sha256(LINEAR_WEIGHTS.read_bytes()).hexdigest()
    assert digest == "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0"


@pytest.mark.parametrize("size", [37, 64, 97])
def test_matches_reference_lpips_package(size, tmp_path, monkeypatch):
    lpips = pytest.importorskip("lpips")
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = lpips.LPIPS(pretrained=True, net="alex", pnet_rand=True, verbose=False).eval()
    # the reference's random AlexNet, saved as a torchvision state dict ('features.<i>.*')
    slices = reference.net.state_dict()  # 'slice<k>.<i>.weight'
    torch.save({"features." + key.split(".", 1)[1]: value for key, value in slices.items()}, tmp_path / ALEXNET_FILE)
    ours = load_lpips(tmp_path / ALEXNET_FILE)
    assert ours.pretrained_backbone
    x, y = torch.rand(2, 5, 3, size, size).mul(2).sub(1)
    if size < 64:  # ours up-samples small inputs; give the reference the same input
        x, y = (torch.nn.functional.interpolate(t, size=64, mode="bilinear", align_corners=False) for t in (x, y))
    with torch.no_grad():
        expected = reference(x, y).reshape(-1)
        got = ours(x, y)
    assert got.shape == (5,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_random_backbone_warns_in_user_words(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.warns(UserWarning, match=r"RANDOM AlexNet.*--lpips-weights"):
        loss = load_lpips()
    assert not loss.pretrained_backbone
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(loss(x, x), torch.zeros(2)) and (loss(x, x.flip(-1)) > 0).all()
