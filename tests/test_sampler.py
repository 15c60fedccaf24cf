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
