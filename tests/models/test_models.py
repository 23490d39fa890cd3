"""Backbones, heads and weight loading."""
import pytest
import torch

from deepmetric.models import WeightsError, build_embedder, load_pretrained, read_state_dict
from tests.conftest import require_module


@pytest.mark.parametrize("pooling", ["avg", "max", "gem", "avgmax"])
@pytest.mark.parametrize("dim, bnneck", [(0, False), (32, True)])
def test_small_cnn_shapes_and_normalisation(pooling, dim, bnneck):
    m = build_embedder("small_cnn", embedding_dim=dim, pooling=pooling, bnneck=bnneck, in_chans=1).eval()
    out = m.forward_train(torch.randn(5, 1, 8, 8))
    d = dim or 128
    assert out["features"].shape == out["neck"].shape == out["embedding"].shape == (5, d)
    assert torch.allclose(out["embedding"].norm(dim=1), torch.ones(5), atol=1e-5)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, d)
    if bnneck:
        assert not m.head.bnneck.bias.requires_grad


def test_avgmax_pooling_is_average_plus_max():
    from deepmetric.models.heads import EmbeddingHead

    fmap = torch.randn(3, 5, 4, 6)
    head = EmbeddingHead(5, pooling="avgmax", normalize=False)
    by_hand = torch.stack([torch.stack([c.mean() + c.max() for c in sample]) for sample in fmap])
    torch.testing.assert_close(head(fmap)["features"], by_hand)


@pytest.mark.parametrize("affine", [True, False])
def test_freeze_batchnorm_keeps_backbone_statistics_across_train_calls(affine):
    m = build_embedder("small_cnn", embedding_dim=8, bnneck=True, in_chans=1)
    bns = m.backbone_batchnorms()
    assert m.freeze_batchnorm(affine=affine) == len(bns) == 4
    before = [bn.running_mean.clone() for bn in bns]
    m.train()  # what the trainer calls: the backbone's BatchNorms stay in eval mode
    assert m.training and m.head.bnneck.training and not any(bn.training for bn in bns)
    m.forward_train(torch.randn(6, 1, 8, 8) * 3 + 1)
    assert all(torch.equal(b, bn.running_mean) for b, bn in zip(before, bns))
    assert all(p.requires_grad is not affine for bn in bns for p in bn.parameters())
    assert m.head.bnneck.weight.requires_grad, "the head's BNNeck is not the backbone's"
    assert m.head.bnneck.num_batches_tracked.item() == 1
    m.eval().train()
    assert not any(bn.training for bn in bns)


def test_pooled_retrieval_is_the_features_under_the_projection():
    """``model.retrieval: pooled``: search and evaluation get the pooled map before the projection,
    L2-normalised; the losses still get the projected embedding; ``retrieval_as`` switches and restores."""
    import torch.nn.functional as F

    from deepmetric.config import ConfigError, load_config
    from deepmetric.core.errors import ParameterError
    from deepmetric.engine.build import build_model
    from deepmetric.models import Ensemble, retrieval_as

    torch.manual_seed(0)
    m = build_embedder("small_cnn", embedding_dim=8, in_chans=1, backbone_options={"width": 8, "grid": 2},
                       retrieval="pooled").eval()
    x = torch.randn(3, 1, 8, 8)
    pooled = F.normalize(m.head.pool(m.backbone(x)).flatten(1), dim=1)
    assert m.embedding_dim == 64 and m.loss_dim == 8  # 16 channels x a 2 x 2 grid; the projection's 8
    torch.testing.assert_close(m(x), pooled)
    assert m(x, all_outputs=True)["embedding"].shape == (3, 8)
    with retrieval_as(m, "embedding"):
        torch.testing.assert_close(m(x), m.forward_train(x)["embedding"])
        assert m.embedding_dim == 8
    torch.testing.assert_close(m(x), pooled)
    raw = build_embedder("small_cnn", embedding_dim=8, in_chans=1, normalize=False, retrieval="pooled").eval()
    torch.testing.assert_close(raw(x), raw.head.pool(raw.backbone(x)).flatten(1))  # unnormalised as asked
    two = build_model(load_config(None, ["model.backbone=small_cnn", "model.in_chans=1", "model.embedding_dim=8",
                                         "model.members=2", "model.retrieval=pooled"]))
    assert isinstance(two, Ensemble) and two.embedding_dim == 2 * 128 and two.eval()(x).shape == (3, 256)
    assert [e.loss_dim for e in two.members] == [8, 8]
    with pytest.raises(ParameterError, match="must be one of embedding, pooled, got 'neck'"):
        build_embedder("small_cnn", in_chans=1, retrieval="neck")
    with pytest.raises(ConfigError, match="model.retrieval"):
        load_config(None, ["model.retrieval=neck"])


def test_unnormalised_embedding_keeps_the_neck():
    m = build_embedder("small_cnn", embedding_dim=16, normalize=False, in_chans=1).eval()
    out = m.forward_train(torch.randn(3, 1, 8, 8))
    assert torch.equal(out["embedding"], out["neck"])


def test_resnet_variants_of_the_seed_systems():
    x = torch.randn(1, 3, 64, 32)
    plain = build_embedder("resnet18").eval()
    reid = build_embedder("resnet18", backbone_options={"last_stride": 1, "stem_relu": False}).eval()
    assert plain.backbone(x).shape[-2:] == (2, 1)
    assert reid.backbone(x).shape[-2:] == (4, 2), "last stride 1 doubles the final map"
    assert isinstance(reid.backbone.relu, torch.nn.Identity)
    assert plain(x).shape == (1, 512)


def test_pretrained_local_torchvision_file_reports_keys(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    m = build_embedder("resnet18", embedding_dim=8)
    report = load_pretrained(m, str(path), "resnet18")
    assert torch.equal(m.backbone.conv1.weight, ref.conv1.weight)
    assert "fc.weight" in report.unexpected and not report.missing
    assert "loaded" in report.summary() and "unexpected 2" in report.summary()


def test_pretrained_errors_name_the_file(tmp_path):
    m = build_embedder("resnet18")
    with pytest.raises(WeightsError, match="weights file not found: .*none.pth"):
        load_pretrained(m, str(tmp_path / "none.pth"), "resnet18")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights file .*junk.pth"):
        read_state_dict(junk)
    other = tmp_path / "other.pth"
    torch.save({"a.b": torch.zeros(2)}, other)
    with pytest.raises(WeightsError, match="no tensor matches this model"):
        load_pretrained(m, str(other), "resnet18")


def test_imagenet_offline_says_to_pass_a_local_file(monkeypatch):
    import torchvision.models as tvm

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(tvm, "get_model", offline)
    with pytest.raises(WeightsError, match="pass a local file instead: model.pretrained=/path/to/resnet50.pth"):
        load_pretrained(build_embedder("resnet18"), "imagenet", "resnet18")


def test_timm_backbone_by_name():
    require_module("timm", "the train extra")
    m = build_embedder("timm:resnet10t", embedding_dim=16).eval()
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 16)
