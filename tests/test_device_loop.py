"""Device-side training loop: metrics fetched on logging steps only, the non-finite check on the
fetched values before any checkpoint, and the two-batch device prefetch."""
import json
import os

import numpy as np
import pytest

from hipt_jax.prefetch import prefetch_to_device


def test_prefetch_keeps_two_in_flight_and_preserves_order():
    """Plant: yield before putting ahead (size 0 in flight) -> the in-flight count check fails;
    a LIFO queue -> the order check fails."""
    taken, put = [], []

    def source():
        for i in range(7):
            taken.append(i)
            yield i

    out = []
    for item in prefetch_to_device(source(), lambda b: put.append(b) or ("dev", b)):
        # When the caller holds batch i, batches i+1 and i+2 have been put already (or the
        # source is exhausted), and nothing beyond them has left the source.
        i = item[1]
        assert put[-1] == min(i + 2, 6) and taken[-1] == min(i + 2, 6)
        out.append(item)
    assert out == [("dev", i) for i in range(7)]
    with pytest.raises(ValueError):
        next(prefetch_to_device([1], lambda b: b, size=0))


def _stage2_config(folder, n=8):
    from configs.pretrain_vit4k import get_config

    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        np.save(os.path.join(folder, f"{i}.npy"), rng.normal(size=(256, 384)).astype(np.float32))
    c = get_config("runlocal")
    c.data.path = str(folder)
    c.total_steps, c.stop_at_step = 6, 6
    c.checkpoint.update(every_steps=4, use_async=False)
    return c


@pytest.fixture(scope="module")
def fetch_log(tmp_path_factory):
    """One tiny stage-2 run with log_every=3: the metric fetches it made."""
    from hipt_jax.pretrain import trainer

    folder = tmp_path_factory.mktemp("device_loop")
    config = _stage2_config(folder / "npy")
    config.log_every = 3
    calls = []
    real = trainer.fetch_metrics

    def counting(pending):
        calls.append([s for s, _ in pending])
        return real(pending)

    mp = pytest.MonkeyPatch()
    mp.setattr(trainer, "fetch_metrics", counting)
    try:
        trainer.train(config, str(folder / "run"))
    finally:
        mp.undo()
    return calls, folder / "run"


def test_metrics_are_fetched_on_logging_and_checkpoint_steps_only(fetch_log):
    """6 steps, log_every 3, checkpoint every 4: 3 transfers (after steps 0, 3 and the last),
    each step's metrics fetched exactly once, metrics.jsonl complete.
    Plant: fetch every step (``_fetch_due`` -> True) -> 6 transfers, the count check fails."""
    calls, run = fetch_log
    transfers = [c for c in calls if c]
    assert transfers == [[0], [1, 2, 3], [4, 5]]
    with open(run / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(6))
    assert sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit()) == [4, 6]


def test_bad_step_between_logging_steps_writes_no_checkpoint_after_it(tmp_path, monkeypatch):
    """Step 1's loss is made non-finite when fetched; it is fetched only at the checkpoint
    boundary (step 4), and that checkpoint must not be written.
    Plant: save the checkpoint before checking the fetched metrics -> checkpoint 4 exists."""
    from hipt_jax.pretrain import trainer

    config = _stage2_config(tmp_path / "npy")
    config.log_every = 100
    real = trainer.fetch_metrics

    def poisoned(pending):
        return [(s, dict(m, loss=float("nan")) if s == 1 else m) for s, m in real(pending)]

    monkeypatch.setattr(trainer, "fetch_metrics", poisoned)
    with pytest.raises(trainer.NonFiniteLossError, match="at step 1"):
        trainer.train(config, str(tmp_path / "run"))
    ckpts = tmp_path / "run" / "checkpoints"
    assert not ckpts.exists() or not [d for d in os.listdir(ckpts) if d.isdigit()]


def test_host_wait_share_is_a_fraction_that_sees_a_slow_host():
    """hipt-profile's share of step time the device waits for the host. A host that needs 50 ms
    per batch for a 5 ms step leaves the device waiting most of the time; a step slower than
    the measured wall time reads 0, never negative. Plant: drop the clip to [0, 1] -> the
    second value is negative and fails."""
    import time

    import jax

    from hipt_jax.profiler import host_wait_share

    step = jax.jit(lambda x: x * 2.0)
    x = np.ones((4,), np.float32)
    step(x).block_until_ready()

    def slow_host(n):
        for _ in range(n):
            time.sleep(0.05)
            yield x

    waiting = host_wait_share(step, slow_host(4), jax.device_put, device_step_s=0.005)
    assert 0.5 < waiting <= 1.0
    busy = host_wait_share(step, (x for _ in range(4)), jax.device_put, device_step_s=10.0)
    assert busy == 0.0
