"""PKBatchSampler: coverage, balance, determinism, sharding and the small-class rule."""
import numpy as np
import pytest

from deepmetric.data import PKBatchSampler


def _labels(counts):
    return np.concatenate([np.full(c, i) for i, c in enumerate(counts)])


def test_every_batch_is_p_classes_by_k_and_laid_out_class_by_class():
    labels = _labels([7, 4, 9, 12, 5, 4, 8, 6])
    s = PKBatchSampler(labels, classes_per_batch=3, samples_per_class=4, seed=1)
    for batch in s:
        assert len(batch) == 12
        lab = labels[batch].reshape(3, 4)
        assert (lab == lab[:, :1]).all(), "each block of K must be one class"
        assert len(set(lab[:, 0])) == 3, "P distinct classes"


def test_covers_every_sample_each_epoch():
    labels = _labels([7, 4, 9, 12, 5, 3, 8, 6, 1])
    s = PKBatchSampler(labels, classes_per_batch=4, samples_per_class=4, seed=0)
    for epoch in range(3):
        s.set_epoch(epoch)
        seen = np.concatenate([np.asarray(b) for b in s])
        assert set(seen.tolist()) == set(range(len(labels)))
    # top-ups are counted: class sizes 7,9,5,3,6,1 are not multiples of 4
    assert s.stats["resampled"] == sum((-c) % 4 for c in [7, 4, 9, 12, 5, 3, 8, 6, 1])
    assert s.stats["singleton_classes"] == 1


def test_deterministic_under_seed_and_different_across_epochs_and_seeds():
    labels = _labels([6] * 10)
    a = list(PKBatchSampler(labels, 4, 3, seed=5))
    b = list(PKBatchSampler(labels, 4, 3, seed=5))
    c = list(PKBatchSampler(labels, 4, 3, seed=6))
    assert a == b and a != c
    s = PKBatchSampler(labels, 4, 3, seed=5)
    s.set_epoch(1)
    assert list(s) != a


def test_balance_each_class_appears_as_often_as_its_chunks():
    labels = _labels([8] * 6 + [4] * 6)
    s = PKBatchSampler(labels, 3, 4, seed=0)
    counts = np.bincount(labels[np.concatenate([np.asarray(b) for b in s])], minlength=12)
    # no filler needed here: each class appears exactly its own size
    assert s.stats["filler_chunks"] == 0
    assert counts.tolist() == [8] * 6 + [4] * 6


@pytest.mark.parametrize("world", [2, 3])
def test_shards_cover_everything_without_sharing_a_batch(world):
    labels = _labels([5, 9, 4, 7, 8, 6, 4, 10])
    shards = [list(PKBatchSampler(labels, 3, 2, seed=3, rank=r, world_size=world)) for r in range(world)]
    assert len({len(x) for x in shards}) == 1, "every rank runs the same number of steps"
    flat = [tuple(b) for shard in shards for b in shard]
    assert len(flat) == len(set(flat)), "no batch repeated across ranks"
    seen = {i for b in flat for i in b}
    assert seen == set(range(len(labels)))


def test_skip_resumes_inside_an_epoch():
    labels = _labels([6] * 8)
    s = PKBatchSampler(labels, 4, 3, seed=2)
    full = list(s)
    s.skip(2)
    assert list(s) == full[2:]
    assert list(s) == full, "skip applies to one iteration only"


def test_too_few_classes_is_a_clear_error():
    with pytest.raises(ValueError, match="classes_per_batch=5 but the training set has only 3 classes"):
        PKBatchSampler(_labels([4, 4, 4]), 5, 2)
