"""PKBatchSampler and RandomBatchSampler: coverage, balance, determinism, sharding, resume and errors."""
import numpy as np
import pytest

from deepmetric.data import PKBatchSampler, RandomBatchSampler


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


# -- RandomBatchSampler ---------------------------------------------------------------------------------

def test_random_batches_are_one_shuffled_pass_with_drop_last():
    s = RandomBatchSampler(50, batch_size=8, seed=0)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s) == 6 and all(len(b) == 8 for b in batches)
        flat = np.concatenate(batches)
        assert len(set(flat.tolist())) == 48, "no image twice in an epoch"
    assert s.stats["dropped"] == 2


def test_random_batches_deterministic_in_seed_and_epoch():
    a = list(RandomBatchSampler(40, 4, seed=5))
    assert a == list(RandomBatchSampler(40, 4, seed=5))
    assert a != list(RandomBatchSampler(40, 4, seed=6))
    s = RandomBatchSampler(40, 4, seed=5)
    s.set_epoch(1)
    assert list(s) != a
    s.set_epoch(0)
    assert list(s) == a


@pytest.mark.parametrize("world", [2, 3])
def test_random_shards_are_disjoint_slices_of_the_one_process_batches(world):
    n, bs = 61, 4
    shards = [list(RandomBatchSampler(n, bs, seed=3, rank=r, world_size=world)) for r in range(world)]
    assert len({len(x) for x in shards}) == 1 and len(shards[0]) == n // (bs * world)
    flat = [i for shard in shards for b in shard for i in b]
    assert len(flat) == len(set(flat)), "ranks never share an image"
    # global step t (rank 0's batch, then rank 1's, ...) is one process's step t at batch world * bs
    single = list(RandomBatchSampler(n, bs * world, seed=3))
    assert len(single) == len(shards[0])
    for t, batch in enumerate(single):
        assert batch == [i for r in range(world) for i in shards[r][t]]


def test_random_skip_resumes_inside_an_epoch():
    s = RandomBatchSampler(30, 4, seed=2, rank=1, world_size=2)
    s.set_epoch(3)
    full = list(s)
    s.skip(2)
    assert list(s) == full[2:]
    assert list(s) == full, "skip applies to one iteration only"


def test_random_batch_larger_than_the_data_is_a_clear_error():
    with pytest.raises(ValueError, match=r"batch_size=8 x 2 process\(es\) but the training set has only 12"):
        RandomBatchSampler(12, 8, world_size=2)
