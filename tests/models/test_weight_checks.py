"""Weight files that cannot be right are refused where they are read: NaN/inf values, and a required
part (the backbone) of another shape."""
import pytest
import torch

from deepmetric.models import WeightsError, build_embedder, load_pretrained, load_weights, read_state_dict
from deepmetric.models.embedder import weight_mismatches


def _small(width=8, dim=4):
    return build_embedder("small_cnn", dim, in_chans=1, backbone_options={"width": width})


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_nonfinite_weights_are_refused_naming_file_and_tensor(tmp_path, suffix):
    state = _small().state_dict()
    state["backbone.body.0.weight"][0, 0, 0, 0] = float("-inf")
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    with pytest.raises(WeightsError, match=rf"{path}: tensor backbone.body.0.weight holds 1 NaN/infinite values"):
        read_state_dict(path)


def test_nonfinite_pretrained_weights_are_refused(tmp_path):
    state = {k: v for k, v in _small().backbone.state_dict().items()}
    state["body.3.weight"].fill_(float("nan"))
    torch.save(state, tmp_path / "trunk.pth")
    with pytest.raises(WeightsError, match="body.3.weight holds"):
        load_pretrained(_small(), str(tmp_path / "trunk.pth"), "small_cnn")


def test_mismatches_list_shapes_first_then_missing_then_unexpected():
    own = _small(8).state_dict()
    other = dict(_small(16).state_dict())
    other["extra.weight"] = torch.zeros(1)
    del other["head.proj.bias"]
    problems = weight_mismatches(own, other)
    assert problems[0] == "tensor backbone.body.0.weight has shape (16, 1, 3, 3) in the file, (8, 1, 3, 3) in the model"
    assert "tensor head.proj.bias of the model is not in the file" in problems
    assert problems[-1] == "tensor extra.weight is in the file but not in the model"
    assert weight_mismatches(own, _small(8).state_dict()) == []
    assert weight_mismatches(own, other, only=("nothing.",)) == []


def test_required_part_must_load_whole_and_nothing_is_copied_otherwise():
    model = _small(8, dim=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError, match=r"src: another architecture than this model \(tensor backbone.body.0.weight"):
        load_weights(model, _small(16).state_dict(), "src", require=("backbone.",))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # another head only: the backbone loads, the head keeps its init (stage two with a new embedding size)
    donor = _small(8, dim=6).state_dict()
    report = load_weights(model, donor, "src", require=("backbone.",))
    assert all(torch.equal(model.state_dict()[k], donor[k]) for k in donor if k.startswith("backbone."))
    assert report.shape_mismatch and all(s.startswith("head.") for s in report.shape_mismatch)


def test_pretrained_weights_for_a_backbone_without_a_resnet_stem(tmp_path):
    """small_cnn has no conv1: its own weights load (this raised AttributeError)."""
    source = _small()
    path = tmp_path / "small.pth"
    torch.save(source.backbone.state_dict(), path)
    target = _small()
    report = load_pretrained(target, str(path), "small_cnn")
    assert not report.missing and not report.unexpected
    assert all(torch.equal(a, b) for a, b in zip(source.backbone.state_dict().values(), target.backbone.state_dict().values()))
