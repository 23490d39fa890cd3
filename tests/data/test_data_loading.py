"""Fast decoding (torchvision.io) and seeded augmentation: same pixels, same errors, same batches."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from deepmetric.config import ConfigError, load_config
from deepmetric.data.base import DataError
from deepmetric.data.io import ImageListDataset, load_image, read_image_tensor
from deepmetric.data.loading import SeededBatchSampler, SeededDataset, loader_settings, sample_seed
from deepmetric.data.samplers import PKBatchSampler
from deepmetric.data.synthetic import make_image_folder
from deepmetric.data.transforms import build_transform
from deepmetric.engine.build import build_transforms
from deepmetric.engine.checkpoint import read_checkpoint
from deepmetric.engine.trainer import Trainer


def _photo(h=45, w=60, seed=0):
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    noisy = np.asarray(base, np.int16) + rng.integers(-20, 20, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _as_array(t):
    return t.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("kind", ["jpeg_rgb", "jpeg_grey", "jpeg_cmyk", "png_rgba", "png_palette_alpha",
                                  "png_16bit", "bmp", "webp"])
def test_tensor_decode_gives_the_pixels_pil_gives(tmp_path, kind):
    img = _photo()
    path = tmp_path / f"x.{kind.split('_')[0].replace('jpeg', 'jpg')}"
    if kind == "jpeg_grey":
        img.convert("L").save(path, quality=90)
    elif kind == "jpeg_cmyk":
        img.convert("CMYK").save(path, quality=90)
    elif kind == "png_rgba":
        Image.fromarray(np.dstack([np.asarray(img), np.full(img.size[::-1], 128, np.uint8)])).save(path)
    elif kind == "png_palette_alpha":
        img.convert("P").save(path, transparency=3)
    elif kind == "png_16bit":
        Image.fromarray((np.asarray(img.convert("L"), np.uint16) * 257)).save(path)
    else:
        img.save(path, quality=90)
    t = read_image_tensor(path)
    assert t.dtype == torch.uint8 and t.shape == (3, 45, 60)
    np.testing.assert_array_equal(_as_array(t), np.asarray(load_image(path)))


def test_tensor_decode_errors_are_the_pil_errors(tmp_path):
    good = tmp_path / "good.jpg"
    _photo(200, 300).save(good, quality=90)
    data = good.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    for path in (cut, junk, tmp_path / "missing.jpg", tmp_path):
        with pytest.raises(DataError) as fast:
            read_image_tensor(path)
        with pytest.raises(DataError) as slow:
            load_image(path)
        assert str(fast.value) == str(slow.value) and str(path) in str(fast.value)
    with pytest.raises(DataError, match="above the limit of 1000"):
        read_image_tensor(good, max_pixels=1000)  # refused from the header, before decoding


def test_decoder_choice_per_preset():
    assert build_transform("imagenet", train=True).decoder == "torchvision"
    assert build_transform("imagenet", train=True, decoder="pil").decoder == "pil"
    assert build_transform("paddle_sop", train=True).decoder == "pil", "Lanczos exists only in PIL"
    with pytest.raises(ValueError, match="Lanczos"):
        build_transform("paddle_sop", train=False, decoder="torchvision")
    cfg = load_config(None, ["data.transform=paddle_sop", "data.decoder=torchvision"])
    with pytest.raises(ConfigError, match="^data.decoder: preset 'paddle_sop'"):
        build_transforms(cfg)


@pytest.mark.parametrize("preset", ["imagenet", "xbm", "reid", "face"])
def test_tensor_and_pil_pipelines_agree(tmp_path, preset):
    """Training: the same random draws (the pipelines consume the generator alike); pixels differ only
    by resize rounding. Evaluation: one pipeline (the deployed preprocessing), whatever hands it the
    image: a path, or the decoded image."""
    path = tmp_path / "x.jpg"
    _photo(150, 200).save(path, quality=95)
    test = build_transform(preset, train=False, image_size=(64, 48) if preset == "reid" else 56)
    assert test.decoder == "file"
    assert torch.equal(test(str(path)), test(load_image(path)))
    for train in (True,):
        outs = {}
        for decoder in ("pil", "torchvision"):
            tf = build_transform(preset, train=train, image_size=(64, 48) if preset == "reid" else 56, decoder=decoder)
            torch.manual_seed(3)
            src = read_image_tensor(path) if decoder == "torchvision" else load_image(path)
            outs[decoder] = tf(src)
        a, b = outs["pil"], outs["torchvision"]
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
        diff = (a - b).abs()
        # normalised units: one grey level is about 0.017 (std 0.229); bilinear rounding stays near it
        assert diff.mean() < 0.02 and diff.max() < 0.25, (preset, train, float(diff.mean()), float(diff.max()))


def test_dataset_hands_tensors_only_to_tensor_pipelines(image_folder):
    paths = sorted(str(p) for p in image_folder.rglob("*.jpg"))[:3]
    seen = []

    def kind(x):
        return Image.Image if isinstance(x, Image.Image) else type(x)

    def spy(decoder):
        def f(x):
            seen.append(kind(x))
            return torch.zeros(1)
        f.decoder = decoder
        return f

    ds = ImageListDataset(paths, [0, 1, 2], transform=spy("torchvision"))
    ds[0]
    ds.subset(np.array([2]))[0]
    ds.with_transform(spy("pil"))[1]
    ImageListDataset(paths, [0, 1, 2], transform=lambda x: seen.append(kind(x)) or torch.zeros(1))[0]
    ds.with_transform(spy("file"))[1]  # the test pipeline decodes the file itself, as deployment does
    assert seen == [torch.Tensor, torch.Tensor, Image.Image, Image.Image, str]


def test_sample_seeds_depend_only_on_position():
    labels = np.repeat(np.arange(6), 4)
    one = SeededBatchSampler(PKBatchSampler(labels, 2, 2, seed=1), seed=9)
    one.set_epoch(1)
    full = list(one)
    # two ranks see the global batches alternately, with the seeds of the one-process run
    shards = []
    for rank in range(2):
        s = SeededBatchSampler(PKBatchSampler(labels, 2, 2, seed=1, rank=rank, world_size=2), seed=9, rank=rank,
                               world_size=2)
        s.set_epoch(1)
        shards.append(list(s))
    assert [b for pair in zip(*shards) for b in pair] == full[: 2 * len(shards[0])]
    # resuming three batches in gives the same tail
    again = SeededBatchSampler(PKBatchSampler(labels, 2, 2, seed=1), seed=9)
    again.set_epoch(1)
    again.skip(3)
    assert list(again) == full[3:]
    seeds = [s for b in full for _, s in b]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2 ** 63 for s in seeds)
    assert sample_seed(9, 1, 0, 0) != sample_seed(9, 0, 1, 0) != sample_seed(9, 0, 0, 1)


def test_seeded_dataset_is_reproducible_and_leaves_the_caller_stream_alone():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3)

    ds = SeededDataset(Noise())
    torch.manual_seed(0)
    expected_next = torch.rand(2)
    torch.manual_seed(0)
    a, b = ds[(1, 123)], ds[(2, 123)]
    assert torch.equal(a, b), "the seed alone decides the draws"
    assert not torch.equal(ds[(1, 124)], a)
    assert torch.equal(torch.rand(2), expected_next), "the caller's generator is not advanced"


def test_loader_settings():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert loader_settings("auto", "auto", cpu).kwargs() == {"num_workers": 0, "pin_memory": False}
    s = loader_settings("auto", "auto", gpu, cpus=16)
    assert (s.num_workers, s.pin_memory, s.persistent_workers, s.prefetch_factor) == (15, True, True, 2)
    assert loader_settings("auto", "auto", gpu, local_world_size=8, cpus=16).num_workers == 1
    assert loader_settings("auto", "auto", gpu, cpus=64).num_workers == 16
    assert loader_settings(3, True, cpu).kwargs() == {"num_workers": 3, "pin_memory": False,
                                                       "persistent_workers": True, "prefetch_factor": 2}
    assert loader_settings(2, False, gpu, persistent=False).kwargs()["persistent_workers"] is False


def _augmented_folder_recipe(tmp_path):
    """Overrides for a tiny augmented (imagenet preset) run on a generated image folder."""
    root = make_image_folder(tmp_path / "imgs", n_classes=4, per_class=4, size=40)
    return ["data.format=image_folder", f"data.root={root}", "data.transform=imagenet", "data.image_size=[24,24]",
            "model.backbone=small_cnn", "model.backbone_options={width: 8}", "model.embedding_dim=8",
            "data.classes_per_batch=2", "data.samples_per_class=2", "optimizer.name=sgd", "optimizer.lr=0.1",
            "train.progress=false", "train.log_every=1", "eval.ks=[1]"]


def test_augmented_training_is_the_same_with_workers_and_after_resume(tmp_path):
    """Six steps with no workers == three steps with two workers + resume + three more."""
    base = _augmented_folder_recipe(tmp_path)
    Trainer(load_config(None, [*base, "train.max_steps=6", "data.num_workers=0"]), tmp_path / "a").fit()
    Trainer(load_config(None, [*base, "train.max_steps=3", "data.num_workers=2"]), tmp_path / "b").fit()
    resumed = Trainer(load_config(None, [*base, "train.max_steps=6", "data.num_workers=2"]), tmp_path / "b",
                      resume=True)
    assert resumed.loader_settings.persistent_workers
    resumed.fit()
    a = load_file(str(read_checkpoint(tmp_path / "a", "last")[0] / "model.safetensors"))
    b = load_file(str(read_checkpoint(tmp_path / "b", "last")[0] / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("preset", ["imagenet", "xbm", "face", "paddle_sop"])
def test_normalising_on_the_device_gives_the_same_batches(tmp_path, preset):
    from deepmetric.data.transforms import BatchNormalize

    path = tmp_path / "x.jpg"
    _photo(150, 200).save(path, quality=95)
    # the test pipeline decodes and normalises in one step, the deployed preprocessing: it never splits
    assert build_transform(preset, train=False, image_size=48).split_normalisation() is None
    for train in (True,):
        full = build_transform(preset, train=train, image_size=48)
        head, tail = full.split_normalisation()
        assert isinstance(tail, BatchNormalize) and head.decoder == full.decoder
        src = read_image_tensor(path) if full.decoder == "torchvision" else load_image(path)
        torch.manual_seed(5)
        expected = full(src)
        torch.manual_seed(5)
        img = head(src)
        assert img.dtype == torch.uint8
        got = tail(torch.stack([img, img]))
        assert got.dtype == torch.float32 and got.shape == (2, *expected.shape)
        torch.testing.assert_close(got[1], expected, atol=1e-5, rtol=0)


def test_presets_that_cannot_normalise_on_the_device(tmp_path):
    from deepmetric.data.loading import normalisation_on_device

    assert build_transform("reid", train=True).split_normalisation() is None  # erasing after normalising
    assert build_transform("tensor", train=True).split_normalisation() is None
    ds = ImageListDataset(["a.jpg"], [0], transform=build_transform("reid", train=True))
    assert normalisation_on_device(ds, "auto", "cuda") == (ds, None)
    assert normalisation_on_device(ds, "auto", "cpu") == (ds, None)
    with pytest.raises(ValueError, match="does not end in float conversion"):
        normalisation_on_device(ds, True, "cpu")
    root = make_image_folder(tmp_path / "imgs", n_classes=3, per_class=4, size=40)
    cfg = load_config(None, ["data.format=image_folder", f"data.root={root}", "data.transform=reid",
                             "data.normalize_on_device=true", "data.classes_per_batch=2"])
    with pytest.raises(ConfigError, match="^data.normalize_on_device: the transform"):
        Trainer(cfg, tmp_path / "run")


def test_training_with_device_normalisation_matches(tmp_path):
    base = [*_augmented_folder_recipe(tmp_path), "train.max_steps=3"]
    plain = Trainer(load_config(None, base), tmp_path / "a")
    assert plain.batch_normalize is None, "auto is off on a CPU"
    plain.fit()
    moved = Trainer(load_config(None, [*base, "data.normalize_on_device=true"]), tmp_path / "b")
    assert moved.batch_normalize is not None
    moved.fit()
    a = load_file(str(read_checkpoint(tmp_path / "a", "last")[0] / "model.safetensors"))
    b = load_file(str(read_checkpoint(tmp_path / "b", "last")[0] / "model.safetensors"))
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    ra, rb = plain.last_result.metrics, moved.last_result.metrics
    assert ra["recall@1"] == rb["recall@1"]
