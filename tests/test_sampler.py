from glimpse.train.sampler import StepBatchSampler


def flat(sampler, steps):
    return [k for s in steps for mb in sampler.step_batches(s) for k in mb]


def test_each_epoch_is_a_permutation_and_epochs_differ():
    s = StepBatchSampler(10, 5, seed=1)
    first, second = flat(s, [0, 1]), flat(s, [2, 3])
    assert sorted(i for i, _ in first) == list(range(10)) == sorted(i for i, _ in second)
    assert first != second


def test_resume_reads_the_same_stream():
    full = list(StepBatchSampler(13, 4, seed=0, max_steps=9))
    resumed = list(StepBatchSampler(13, 4, seed=0, start_step=5, max_steps=9))
    assert resumed == full[5:]


def test_processes_and_accumulation_split_the_same_global_batch():
    one = StepBatchSampler(50, 8, seed=3)
    parts = [StepBatchSampler(50, 8, seed=3, rank=r, world_size=2, grad_accum=2) for r in range(2)]
    for step in range(4):
        split = [k for p in parts for mb in p.step_batches(step) for k in mb]
        assert split == one.step_batches(step)[0]


def padded_tokens(batches, lengths):
    return sum(len(b) * max(lengths[i] for i, _ in b) for b in batches)


def test_length_grouping_cuts_padding_and_keeps_epochs_whole_and_random():
    import numpy as np

    lengths = np.random.default_rng(0).integers(20, 100, 203)
    grouped = StepBatchSampler(203, 8, seed=5, lengths=lengths, group=4)
    plain = StepBatchSampler(203, 8, seed=5)
    # an epoch is the 25 whole batches of 8 (3 items sit it out), each item at most once
    epoch = [grouped.step_batches(s)[0] for s in range(25)]
    items = [i for b in epoch for i, _ in b]
    assert len(items) == len(set(items)) == 200
    # batches hold samples of about one length: far less padding than random batches
    assert padded_tokens(epoch, lengths) < 0.8 * padded_tokens([plain.step_batches(s)[0] for s in range(25)], lengths)
    # yet the order is still random: the next epoch differs, and batch lengths do not just fall
    nxt = [grouped.step_batches(s)[0] for s in range(25, 50)]
    assert nxt != epoch
    longest = [max(lengths[i] for i, _ in b) for b in epoch]
    assert longest != sorted(longest, reverse=True)
    # resuming mid-run and splitting over processes read the same stream
    resumed = StepBatchSampler(203, 8, seed=5, lengths=lengths, group=4, start_step=30, max_steps=40)
    assert list(resumed) == [grouped.step_batches(s)[0] for s in range(30, 40)]
    parts = [StepBatchSampler(203, 8, seed=5, lengths=lengths, group=4, rank=r, world_size=2) for r in range(2)]
    assert [k for p in parts for k in p.step_batches(7)[0]] == grouped.step_batches(7)[0]


def test_lengths_must_match_the_items():
    import pytest

    with pytest.raises(ValueError, match="3 lengths for 4 items"):
        StepBatchSampler(4, 2, seed=0, lengths=[1, 2, 3])
