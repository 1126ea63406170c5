"""DynamicBatcher: batching of concurrent callers, its limits, its delay, errors and shutdown.

The oracle is the model function on each request's own rows: whatever the batcher groups, every
caller must get those rows, to within the float32 rounding of another summation order (a BLAS picks
other kernels for other batch shapes), and never another caller's or another row's.
"""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest

from mnist_deploy.serve import batching
from mnist_deploy.serve.batching import BatcherClosed, DynamicBatcher

RNG = np.random.default_rng(0)
W = RNG.standard_normal((784, 10)).astype(np.float32)
B = RNG.standard_normal(10).astype(np.float32)


def assert_rows(y: np.ndarray, x: np.ndarray) -> None:
    """``y`` is ``x @ W + B`` row for row, whatever batch the rows were computed in.

    A logit is a sum of n = 785 float32 terms (784 products and the bias). Summed in float32 in any
    order, as a BLAS does it (other kernels, blockings and FMA use for other batch shapes), the result
    is within gamma_n * sum|terms| of the exact sum, gamma_n = n u / (1 - n u), u = eps / 2 (Higham,
    Accuracy and Stability of Numerical Algorithms, 2nd ed., section 3.1); the exact sum is computed
    here in float64, where the products of float32 values are exact. So two summation orders (a row
    alone, the row in a batch) agree to twice that, whatever the BLAS: about 0.03 here on logits of
    magnitude ~15, while another row's logits differ by ~10 (independent random rows), so a row
    answered with a neighbour's logits, or rows in the wrong order, fail by orders of magnitude.
    A fixed atol cannot say this: 1e-5 was broken by another BLAS's order (2.9e-5 on an AMD EPYC).
    """
    assert y.shape == (len(x), 10) and y.dtype == np.float32
    x64, w64, b64 = x.astype(np.float64), W.astype(np.float64), B.astype(np.float64)
    n, u = x.shape[1] + 1, np.finfo(np.float32).eps / 2
    bound = n * u / (1 - n * u) * (np.abs(x64) @ np.abs(w64) + np.abs(b64))
    err = np.abs(y.astype(np.float64) - (x64 @ w64 + b64))
    assert (err <= bound).all(), (
        f"rows are not their own: max |diff| {err.max():.3g} where float32 summation allows at most "
        f"{bound.max():.3g} (a mixed-up row, not rounding)")


class Model:
    """A linear layer (row-wise, so batching cannot change a row's result beyond the float32 rounding
    of another summation order) that records its calls."""

    def __init__(self, fail_on_nan: bool = False) -> None:
        self.calls: list[int] = []
        self.fail_on_nan = fail_on_nan

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(len(x))
        if self.fail_on_nan and np.isnan(x).any():
            raise FloatingPointError("NaN in the batch")
        return x @ W + B


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 784), dtype=np.float32)


def run(coro):
    return asyncio.run(coro)


def _concurrent_callers(model, run_in_thread: bool, delay_us: int):
    """60 callers of 1-5 rows each, arriving in no particular order: (their inputs, what each got)."""
    sizes = [random.Random(i).randint(1, 5) for i in range(60)]
    inputs = [rows(n, seed) for seed, n in enumerate(sizes)]

    async def caller(b: DynamicBatcher, x: np.ndarray, i: int) -> np.ndarray:
        await asyncio.sleep(random.Random(i).random() * 0.005)  # arrive in no particular order
        return await b.infer(x)

    async def main():
        b = DynamicBatcher(model, max_batch_size=32, max_queue_delay_us=delay_us, run_in_thread=run_in_thread)
        out = await asyncio.gather(*(caller(b, x, i) for i, x in enumerate(inputs)))
        await b.close()
        return out

    return inputs, run(main())


@pytest.mark.parametrize("run_in_thread", [False, True], ids=["inline", "thread"])
@pytest.mark.parametrize("delay_us", [0, 2000])
def test_concurrent_callers_share_calls_and_get_their_own_rows(run_in_thread, delay_us):
    model = Model()
    inputs, outputs = _concurrent_callers(model, run_in_thread, delay_us)
    for x, y in zip(inputs, outputs, strict=True):
        assert_rows(y, x)
    assert sum(model.calls) == sum(len(x) for x in inputs)
    assert len(model.calls) < len(inputs)
    assert max(model.calls) <= 32


def test_other_summation_orders_pass_the_row_check():
    """Two float32 summation orders of the same rows (sequential, forwards and backwards: no BLAS
    involved) differ by far more than the old fixed atol of 1e-5, and both pass the derived bound."""
    x = rows(64, 7)
    terms = x[:, :, None] * W[None]  # float32 products, (64, 784, 10)
    forwards = np.cumsum(terms, axis=1, dtype=np.float32)[:, -1] + B
    backwards = np.cumsum(terms[:, ::-1], axis=1, dtype=np.float32)[:, -1] + B
    assert np.abs(forwards - backwards).max() > 1e-5
    assert_rows(forwards, x)
    assert_rows(backwards, x)
    assert_rows(x @ W + B, x)  # and this BLAS, whatever kernel it picks


class _MixedUp(Model):
    """A model with a row bug in batches of more than one row: ``how`` says which."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = super().__call__(x)
        if len(y) < 2:
            return y
        if self.how == "neighbour":  # the last row answered with its neighbour's logits
            y[-1] = y[-2]
        elif self.how == "swapped":  # two rows swapped
            y[[0, 1]] = y[[1, 0]]
        elif self.how == "shuffled":
            y = y[np.random.default_rng(len(y)).permutation(len(y))]
        return y


class _ReversedConcat:
    """numpy, except that ``concatenate`` joins the callers in reverse order: a batcher that slices the
    answers in the order it queued the callers hands each one another caller's rows."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def concatenate(arrays, *args, **kwargs):
        return np.concatenate(list(arrays)[::-1], *args, **kwargs)


@pytest.mark.parametrize("bug", ["neighbour", "swapped", "shuffled", "callers-swapped"])
def test_the_row_check_catches_mixed_up_rows(monkeypatch, bug):
    """The tolerance is not so loose that a mix-up passes: inject each bug, the check must fail."""
    if bug == "callers-swapped":
        monkeypatch.setattr(batching, "np", _ReversedConcat())
        model = Model()
    else:
        model = _MixedUp(bug)
    inputs, outputs = _concurrent_callers(model, run_in_thread=False, delay_us=2000)
    assert max(model.calls) > 1  # batches were formed, so the bug was hit
    with pytest.raises(AssertionError, match="rows are not their own"):
        for x, y in zip(inputs, outputs, strict=True):
            assert_rows(y, x)


def test_delay_zero_takes_what_is_queued_in_one_call():
    model = Model()

    async def main():
        b = DynamicBatcher(model, max_batch_size=64, max_queue_delay_us=0)
        for round_ in range(3):  # also once the scheduler is idle, waiting for work
            await asyncio.gather(*(b.infer(rows(1, round_ * 100 + i)) for i in range(10)))
        await b.close()

    run(main())
    assert model.calls == [10, 10, 10]


def test_max_batch_size_is_respected_and_a_full_batch_does_not_wait():
    model = Model()

    async def main():
        b = DynamicBatcher(model, max_batch_size=4, max_queue_delay_us=30_000_000)  # 30 s
        t0 = time.perf_counter()
        await asyncio.gather(*(b.infer(rows(1, i)) for i in range(20)))
        elapsed = time.perf_counter() - t0
        await b.close()
        return elapsed

    elapsed = run(main())
    assert model.calls == [4] * 5
    assert elapsed < 5.0  # full batches go at once; waiting for the delay would take 30 s


def test_a_batch_never_splits_a_request_across_calls():
    model = Model()
    inputs = [rows(3, i) for i in range(5)]  # 3 + 3 fits in 7, a third does not

    async def main():
        b = DynamicBatcher(model, max_batch_size=7, max_queue_delay_us=30_000_000)
        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(b.infer(x)) for x in inputs]
        await asyncio.wait(tasks[:4])  # two full batches: the next request did not fit
        elapsed = time.perf_counter() - t0
        assert not tasks[4].done()  # 3 rows alone are not full: it waits for the delay
        await b.close()  # ... or for close(), which drains it
        return [t.result() for t in tasks], elapsed

    outputs, elapsed = run(main())
    assert model.calls == [6, 6, 3]
    assert elapsed < 5.0
    for x, y in zip(inputs, outputs, strict=True):
        assert_rows(y, x)


def test_delay_is_waited_for_and_bounded():
    model = Model()
    delay = 0.05

    async def main():
        b = DynamicBatcher(model, max_batch_size=64, max_queue_delay_us=int(delay * 1e6))
        t0 = time.perf_counter()
        first = asyncio.ensure_future(b.infer(rows(1, 0)))
        await asyncio.sleep(delay / 5)
        second = asyncio.ensure_future(b.infer(rows(2, 1)))
        await asyncio.gather(first, second)
        elapsed = time.perf_counter() - t0
        await b.close()
        return elapsed

    elapsed = run(main())
    assert model.calls == [3]  # the second request joined the first's batch while it waited
    assert delay <= elapsed < delay + 2.0  # not before the delay; not much later (loose: shared CPUs)


def test_oversized_request_runs_alone():
    model = Model()
    big = rows(10, 0)
    small = [rows(1, i) for i in range(1, 4)]

    async def main():
        b = DynamicBatcher(model, max_batch_size=4, max_queue_delay_us=0)
        out = await asyncio.gather(b.infer(small[0]), b.infer(big), b.infer(small[1]), b.infer(small[2]))
        await b.close()
        return out

    out = run(main())
    assert model.calls == [1, 10, 2]
    assert_rows(out[1], big)


def test_preferred_size_dispatches_at_once_and_cuts_the_batch_when_the_delay_runs_out():
    model = Model()

    async def main():
        b = DynamicBatcher(model, max_batch_size=8, max_queue_delay_us=30_000_000, preferred_batch_sizes=[4])
        t0 = time.perf_counter()
        await asyncio.gather(*(b.infer(rows(1, i)) for i in range(4)))
        assert time.perf_counter() - t0 < 5.0  # the largest preferred size goes without waiting
        await b.close()

        c = DynamicBatcher(model, max_batch_size=8, max_queue_delay_us=20_000, preferred_batch_sizes=[2, 6])
        await asyncio.gather(*(c.infer(rows(1, i)) for i in range(3)))
        await c.close()

    run(main())
    # 3 queued when the delay ran out: cut at the preferred 2, then the third (already late) alone
    assert model.calls == [4, 2, 1]


def test_an_exception_reaches_its_batch_only():
    model = Model(fail_on_nan=True)
    bad = rows(1, 0)
    bad[0, 5] = np.nan
    inputs = [bad, rows(1, 1), rows(1, 2), rows(1, 3)]

    async def main():
        b = DynamicBatcher(model, max_batch_size=2, max_queue_delay_us=0)
        out = await asyncio.gather(*(b.infer(x) for x in inputs), return_exceptions=True)
        after = await b.infer(rows(1, 4))  # the scheduler survives
        await b.close()
        return out, after

    out, after = run(main())
    assert model.calls == [2, 2, 1]
    assert isinstance(out[0], FloatingPointError) and isinstance(out[1], FloatingPointError)
    for x, y in zip(inputs[2:], out[2:], strict=True):
        assert_rows(y, x)
    assert after.shape == (1, 10)


def test_a_model_that_returns_the_wrong_number_of_rows_fails_the_batch():
    async def main():
        b = DynamicBatcher(lambda x: x[:1] @ W, max_batch_size=8, max_queue_delay_us=0)
        out = await asyncio.gather(b.infer(rows(1, 0)), b.infer(rows(1, 1)), return_exceptions=True)
        await b.close()
        return out

    out = run(main())
    assert all(isinstance(e, RuntimeError) and "1 rows for a batch of 2" in str(e) for e in out)


def test_a_cancelled_caller_does_not_disturb_the_others():
    model = Model()

    async def main():
        b = DynamicBatcher(model, max_batch_size=8, max_queue_delay_us=50_000)
        gone = asyncio.ensure_future(b.infer(rows(5, 0)))
        stays = asyncio.ensure_future(b.infer(rows(1, 1)))
        await asyncio.sleep(0.005)
        gone.cancel()
        y = await stays
        await b.close()
        return y

    y = run(main())
    assert model.calls == [1]
    assert_rows(y, rows(1, 1))


def test_close_drains_pending_requests_then_refuses_new_ones():
    model = Model()

    async def main():
        b = DynamicBatcher(model, max_batch_size=64, max_queue_delay_us=30_000_000)
        pending = [asyncio.ensure_future(b.infer(rows(1, i))) for i in range(3)]
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        await b.close()
        out = await asyncio.gather(*pending)
        with pytest.raises(BatcherClosed):
            await b.infer(rows(1, 9))
        return out, time.perf_counter() - t0

    out, elapsed = run(main())
    assert model.calls == [3] and elapsed < 5.0
    assert [y.shape for y in out] == [(1, 10)] * 3


def test_close_without_drain_fails_pending_requests():
    model = Model()

    async def main():
        b = DynamicBatcher(model, max_batch_size=64, max_queue_delay_us=30_000_000)
        pending = [asyncio.ensure_future(b.infer(rows(1, i))) for i in range(3)]
        await asyncio.sleep(0.01)
        await b.close(drain=False)
        return await asyncio.gather(*pending, return_exceptions=True)

    out = run(main())
    assert model.calls == []
    assert all(isinstance(e, BatcherClosed) for e in out)


def test_on_batch_reports_rows_and_queue_times():
    seen: list[tuple[int, list[float]]] = []

    async def main():
        b = DynamicBatcher(Model(), max_batch_size=64, max_queue_delay_us=20_000,
                           on_batch=lambda n, waits: seen.append((n, waits)))
        await asyncio.gather(b.infer(rows(2, 0)), b.infer(rows(3, 1)))
        await b.close()

    run(main())
    assert len(seen) == 1
    n, waits = seen[0]
    assert n == 5 and len(waits) == 2
    assert all(0.015 <= w < 2.0 for w in waits)  # both waited for the 20 ms delay


@pytest.mark.parametrize("kwargs", [dict(max_batch_size=0, max_queue_delay_us=0),
                                    dict(max_batch_size=4, max_queue_delay_us=-1),
                                    dict(max_batch_size=4, max_queue_delay_us=0, preferred_batch_sizes=[8])])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        DynamicBatcher(Model(), **kwargs)
