"""The static-shape cache's policy, with a compile function that counts: when a shape gets its own compile,
how many are kept, that a steady mix of more shapes than slots settles instead of recompiling, and that a
failed compile leaves the shape on the dynamic model."""

from __future__ import annotations

import itertools

from mnist_deploy.formats.static_shapes import StaticShapes


class _Compiler:
    def __init__(self, fail: set | frozenset = frozenset()) -> None:
        self.calls: list[tuple] = []
        self.fail = fail

    def __call__(self, shape):
        self.calls.append(shape)
        if shape in self.fail:
            raise RuntimeError("cannot compile this shape\nsecond line")
        return ("compiled", shape)


def test_a_shape_gets_its_compile_on_its_second_call_and_keeps_it():
    compiler = _Compiler()
    cache = StaticShapes(compiler, capacity=4)
    assert cache.get((5, 784)) is None  # a one-off stays on the dynamic model
    assert cache.get((7, 784)) is None
    assert cache.get((5, 784)) == ("compiled", (5, 784))
    for _ in range(10):
        assert cache.get((5, 784)) == ("compiled", (5, 784))
    assert compiler.calls == [(5, 784)] and cache.compiles == 1 and len(cache.compile_ms) == 1
    assert list(cache.models) == [(5, 784)]


def test_never_more_than_capacity_and_a_steady_mix_of_more_shapes_settles():
    compiler = _Compiler()
    cache = StaticShapes(compiler, capacity=3, idle_calls=50)
    shapes = [(n, 784) for n in range(1, 9)]  # 8 sizes in turn, each every 8 calls: none goes idle
    for shape in itertools.islice(itertools.cycle(shapes), 2000):
        got = cache.get(shape)
        assert len(cache.models) <= 3
        assert got is None or got == ("compiled", shape)
    assert cache.compiles == 3 and set(cache.models) == set(shapes[:3])  # compiled once, then no churn


def test_a_shape_gone_idle_makes_room_for_a_new_one():
    compiler = _Compiler()
    cache = StaticShapes(compiler, capacity=2, idle_calls=10)
    for shape in [(1,), (1,), (2,), (2,)]:
        cache.get(shape)
    assert set(cache.models) == {(1,), (2,)}
    for _ in range(5):  # (1,) still in use: a new shape waits on the dynamic model
        assert cache.get((3,)) is None
        cache.get((1,))
    assert set(cache.models) == {(1,), (2,)}
    for _ in range(12):  # now (2,) has not been called for more than 10 calls: (3,) takes its place
        cache.get((1,))
    assert cache.get((3,)) == ("compiled", (3,))
    assert set(cache.models) == {(1,), (3,)} and cache.compiles == 3


def test_once_full_at_most_one_compile_per_idle_calls_whatever_the_mix():
    compiler = _Compiler()
    cache = StaticShapes(compiler, capacity=2, idle_calls=10)
    shapes = [(n,) for n in range(1, 101)]  # 100 sizes in turn: every cached one goes idle before it returns
    for shape in itertools.islice(itertools.cycle(shapes), 1000):
        cache.get(shape)
    assert len(cache.models) <= 2
    assert 2 < cache.compiles <= 2 + 1000 // 11  # replacements happen, but never more than one per 11 calls


def test_a_failed_compile_falls_back_and_is_not_retried():
    compiler = _Compiler(fail={(4, 784)})
    cache = StaticShapes(compiler, capacity=2)
    for _ in range(5):
        assert cache.get((4, 784)) is None
    assert compiler.calls == [(4, 784)] and cache.compiles == 0 and not cache.models
    assert cache.failed == {(4, 784): "RuntimeError: cannot compile this shape"}
    cache.get((2, 784))
    assert cache.get((2, 784)) == ("compiled", (2, 784))  # other shapes still get theirs


def test_capacity_zero_is_the_dynamic_model_only():
    compiler = _Compiler()
    cache = StaticShapes(compiler, capacity=0)
    assert all(cache.get((8, 784)) is None for _ in range(5))
    assert not compiler.calls and cache.describe() == "dynamic"
    assert StaticShapes(compiler).describe().startswith("static per batch size")
