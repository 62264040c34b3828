import numpy as np
import pytest

from inference.candidates import CandidateTracker, candidates_from_frames, find_candidates


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("gap", [1, 3, 5, 8])
def test_spacing_at_least_min_gap(seed, gap):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 120))
    m, v = rng.standard_normal(n), rng.random(n)
    c = find_candidates(m, v, gap)
    assert c == sorted(c) and len(set(c)) == len(c)
    assert all(b - a >= gap for a, b in zip(c, c[1:]))
    assert all(0 <= i < n for i in c)
    assert len(c) >= 1


def test_extrema_are_found():
    n = 60
    t = np.arange(n)
    mean = 100 - 30 * np.exp(-0.5 * ((t - 20) / 4) ** 2)  # contrast bolus: mean minimum at 20
    var = 10 + 50 * np.exp(-0.5 * ((t - 40) / 3) ** 2)  # variance maximum at 40
    c = find_candidates(mean, var, 5)
    assert 20 in c and 40 in c
    assert all(b - a >= 5 for a, b in zip(c, c[1:]))


def test_flat_series_gives_one_candidate():
    assert find_candidates([1.0] * 30, [2.0] * 30, 5) == [0]
    assert find_candidates([3.0], [1.0], 5) == [0]
    assert find_candidates([], [], 5) == []


def test_min_gap_configurable():
    rng = np.random.default_rng(3)
    m, v = rng.standard_normal(200), rng.standard_normal(200)
    n1 = len(find_candidates(m, v, 1))
    n5 = len(find_candidates(m, v, 5))
    n10 = len(find_candidates(m, v, 10))
    assert n1 > n5 > n10


def test_streaming_decides_with_bounded_lag():
    rng = np.random.default_rng(0)
    m, v = rng.standard_normal(100), rng.standard_normal(100)
    t = CandidateTracker(5)
    got = []
    for i in range(100):
        got += t.push(i, m[i], v[i])
        assert t.decided_upto >= i - 5 + 1  # frame i-g decided once frame i is seen
        assert len(t._win) <= 2 * 5 + 1
    got += t.finish()
    assert got == find_candidates(m, v, 5) == t.accepted


def test_push_out_of_order_rejected():
    t = CandidateTracker(5)
    t.push(0, 1, 1)
    with pytest.raises(ValueError):
        t.push(2, 1, 1)
    with pytest.raises(ValueError):
        CandidateTracker(0)


def test_candidates_from_frames():
    frames = [np.full((4, 4), v, np.float32) for v in [5, 4, 3, 2, 1, 2, 3, 4, 5, 6, 7, 8]]
    c = candidates_from_frames(frames, 3)
    assert 4 in c  # the minimum
