import itertools

import numpy as np
import pytest

from dlarch_lib import nas, pareto

SPACE = nas.SearchSpace.from_dict({"a": (0, 1, 2, 3), "b": (0, 1, 2, 3), "c": (0, 1)})


def toy_objectives(config):
    """Two conflicting objectives on SPACE: a + b against (3 - a) + (3 - b) + c, plus a bump."""
    a, b, c = config["a"], config["b"], config["c"]
    return (a + b + 0.5 * c, (3 - a) + (3 - b) + c + 0.25 * (a == 2))


def test_dominance_and_the_front_follow_the_definition():
    assert pareto.dominates([1, 2], [1, 3]) and not pareto.dominates([1, 3], [1, 3])
    assert not pareto.dominates([0, 4], [1, 3]) and not pareto.dominates([1, 3], [0, 4])
    rng = np.random.default_rng(0)
    f = rng.integers(0, 6, size=(40, 3)).astype(float)  # ties and duplicates on purpose
    brute = [not any(pareto.dominates(f[j], f[i]) for j in range(len(f))) for i in range(len(f))]
    assert pareto.pareto_mask(f).tolist() == brute
    rank = pareto.non_dominated_sort(f)
    for front in range(rank.max() + 1):  # front k: nothing in fronts >= k dominates it, something in k - 1 does
        members = np.flatnonzero(rank == front)
        later = f[rank >= front]
        assert all(not any(pareto.dominates(g, f[i]) for g in later) for i in members)
        if front:
            assert all(any(pareto.dominates(g, f[i]) for g in f[rank == front - 1]) for i in members)


def test_the_front_agrees_with_optuna():
    optuna = pytest.importorskip("optuna")
    rng = np.random.default_rng(1)
    f = np.round(rng.random((60, 2)), 1)
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.add_trials([optuna.trial.create_trial(values=list(v), params={}, distributions={}) for v in f])
    assert sorted(t.number for t in study.best_trials) == np.flatnonzero(pareto.pareto_mask(f)).tolist()


def test_crowding_distance_by_hand():
    f = np.array([[0.0, 4.0], [1.0, 2.0], [2.0, 1.0], [4.0, 0.0]])
    d = pareto.crowding_distance(f)
    assert np.isinf(d[0]) and np.isinf(d[3])
    np.testing.assert_allclose(d[1:3], [2 / 4 + 3 / 4, 3 / 4 + 2 / 4])


def test_hypervolume_is_the_area_of_the_union_of_boxes():
    rng = np.random.default_rng(2)
    f = rng.random((25, 2))
    ref = np.array([1.1, 1.2])
    xs = np.linspace(0, ref[0], 1101)[:-1] + ref[0] / 2200  # cell centres of a fine grid
    ys = np.linspace(0, ref[1], 1201)[:-1] + ref[1] / 2400
    gx, gy = np.meshgrid(xs, ys)
    covered = ((f[:, 0, None, None] <= gx) & (f[:, 1, None, None] <= gy)).any(0)
    assert pareto.hypervolume(f, ref) == pytest.approx(covered.mean() * ref.prod(), abs=5e-3)
    assert pareto.hypervolume([[0.5, 0.5], [2.0, 0.0]], [1.0, 1.0]) == pytest.approx(0.25)  # outside adds nothing
    with pytest.raises(ValueError, match="2-D"):
        pareto.hypervolume(np.zeros((3, 3)), [1, 1, 1])


def test_hypervolume_matches_optuna():
    pytest.importorskip("optuna")
    from optuna._hypervolume import compute_hypervolume

    f = np.random.default_rng(3).random((30, 2))
    assert pareto.hypervolume(f, [1.0, 1.0]) == pytest.approx(compute_hypervolume(f, np.array([1.0, 1.0])))


def true_front(objectives):
    values = np.array([objectives(SPACE.decode(p)) for p in SPACE.all()])
    return values, pareto.hypervolume(values, values.max(0) + 1)


@pytest.mark.parametrize("search", [pareto.random_pareto_search, pareto.nsga2, pareto.pareto_local_search])
def test_searches_spend_the_budget_and_reach_the_front(search):
    values, hv_all = true_front(toy_objectives)
    result = search(toy_objectives, SPACE, 30, seed=0)
    assert len(result.values) == 30 and len(set(result.points)) <= 30
    ref = values.max(0) + 1
    curve = result.hypervolume_curve(ref)
    assert np.all(np.diff(curve) >= -1e-12) and curve[-1] <= hv_all + 1e-12  # monotone, never beyond the truth
    assert curve[-1] > 0.8 * hv_all


def test_local_search_never_repeats_and_finds_the_whole_front_with_the_whole_space():
    values, hv_all = true_front(toy_objectives)
    result = pareto.pareto_local_search(toy_objectives, SPACE, len(SPACE), seed=1)
    assert len(set(result.points)) == len(result.points)
    assert pareto.hypervolume(result.value_array, values.max(0) + 1) == pytest.approx(hv_all)


def test_nsga2_keeps_whole_fronts_then_the_least_crowded():
    f = np.array([[0, 3], [1, 2], [2, 1], [3, 0], [1, 3], [2, 2.5], [3, 2], [1.5, 3.5]], dtype=float)
    keep = sorted(pareto._environmental_selection(f, 6).tolist())
    assert keep[:4] == [0, 1, 2, 3]  # the whole first front
    assert set(keep[4:]) == {4, 6}  # of the second front [4, 5, 6], the middle one is the most crowded


def test_optuna_search_records_every_trial():
    optuna = pytest.importorskip("optuna")
    result = pareto.optuna_pareto_search(
        toy_objectives, SPACE, 12, sampler=optuna.samplers.NSGAIISampler(population_size=4, seed=0)
    )
    assert len(result.values) == 12 and all(len(v) == 2 for v in result.values)


def test_latency_is_measured_once_per_network():
    space = nas.SearchSpace.from_dict(
        {"depth": (1, 2), "width": (8,), "activation": ("relu",), "skip": (False, True), "lr": (1e-3, 1e-2)}
    )
    lat = pareto.latency_ms(space, device="cpu", rounds=2)
    assert set(lat) == {(1, 8, "relu", False), (2, 8, "relu", False), (2, 8, "relu", True)}  # skip is moot at depth 1
    assert all(v > 0 for v in lat.values())
    assert pareto.structure({"depth": 1, "width": 8, "activation": "relu", "skip": True, "lr": 0.1}) == (
        1,
        8,
        "relu",
        False,
    )


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"\(n, m\)"):
        pareto.pareto_mask([1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        pareto.non_dominated_sort([[0, np.nan]])
    with pytest.raises(ValueError, match="population_size"):
        pareto.nsga2(toy_objectives, SPACE, 10, population_size=1)
    with pytest.raises(ValueError, match="network decisions"):
        pareto.latency_ms(SPACE, device="cpu")
    assert list(itertools.islice(pareto._one_change_neighbours((0, 0, 0), SPACE), 3)) == [
        (1, 0, 0),
        (2, 0, 0),
        (3, 0, 0),
    ]
