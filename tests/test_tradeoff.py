import numpy as np

from exporter.evaluate.tradeoff import (
    Scored,
    Targets,
    candidates,
    choose,
    diluted,
    meets,
    pareto_front,
    plot_front,
    pooled,
    worst_rates,
)
from exporter.patch.candidate import Candidate, Mode


def _marked(path) -> int:
    """Pixels of the plot in the colour that rings the chosen candidate (matplotlib's C3)."""
    import matplotlib.image

    rgb = matplotlib.image.imread(str(path))[..., :3]
    return int((np.abs(rgb - np.array([0xD6, 0x27, 0x28]) / 255).max(-1) < 0.08).sum())


def _s(n, leak, kl):
    return Scored(Candidate(n, 0.0, "folded"), leak, leak, kl, 10 + kl)


def test_front_and_choice():
    pts = [
        _s(10, 0.30, 0.001),
        _s(25, 0.05, 0.004),
        _s(50, 0.0, 0.010),
        _s(60, 0.0, 0.020),
        _s(70, 0.2, 0.03),
    ]
    assert [s.candidate.n for s in pareto_front(pts)] == [10, 25, 50]
    chosen, met = choose(pts, Targets(0.01))
    assert (chosen.candidate.n, met) == (50, True)
    chosen, met = choose(pts, Targets(0.10))
    assert (chosen.candidate.n, met) == (25, True)
    chosen, met = choose(pts[:1] + pts[4:], Targets(0.01))  # nobody meets it: the least leaky
    assert (chosen.candidate.n, met) == (70, False)
    assert len(candidates([25, 50], [0.0, 0.05], ["folded", "exact"])) == 8


def test_plot_front_draws_every_candidate_and_rings_the_choice(tmp_path):
    pts = [_s(10, 0.3, 0.001), _s(50, 0.0, 0.01)]
    path = plot_front(pts, pts[1], Targets(0.01), tmp_path / "front.png")
    import matplotlib.image

    assert matplotlib.image.imread(str(path)).shape[:2] == (540, 840)  # 7 x 4.5 inches at 120 dpi
    assert _marked(path) > 50  # the ring around the chosen point


def test_candidates_not_attacked_are_never_chosen(tmp_path):
    from exporter.evaluate.tradeoff import meets

    pts = [_s(10, None, 0.001), _s(50, 0.0, 0.01), _s(70, 0.3, 0.002)]
    pts[0].username = None
    assert not meets(pts[0], Targets(1.0)) and meets(pts[1], Targets(0.01))
    assert choose(pts, Targets(0.01))[0].candidate.n == 50
    assert [s.candidate.n for s in pareto_front(pts)] == [70, 50]
    assert _marked(plot_front(pts, pts[1], Targets(0.01), tmp_path / "front.png")) > 50


def test_a_candidate_that_collapses_is_passed_over():
    quiet, loud = _s(50, 0.0, 0.001), _s(100, 0.0, 0.004)
    quiet.repetition, loud.repetition = 0.13, 0.05
    assert choose([quiet, loud], Targets(0.01))[0] is quiet  # no collapse check: least KL
    chosen, met = choose([quiet, loud], Targets(0.01, max_repetition=0.07))
    assert chosen is loud and met
    # only a collapsing one: not met
    chosen, met = choose([quiet], Targets(0.01, max_repetition=0.07))
    assert chosen is quiet and not met
    # A candidate whose collapse check never ran (its leakage was not met) does not meet a
    # repetition limit.
    unchecked = _s(30, 0.0, 0.002)
    assert not meets(unchecked, Targets(0.01, max_repetition=0.07)) and meets(
        unchecked, Targets(0.01)
    )


def test_candidates_of_every_mode_and_gate_and_what_each_export_carries():
    cands = candidates([25, 50], [0.0], ["folded", "plain"], [False, True])
    # A plain candidate acts on every token: it comes once per size, ungated.
    assert [(c.n, c.mode, c.gated) for c in cands] == [
        (25, Mode.FOLDED, False), (50, Mode.FOLDED, False), (25, Mode.PLAIN, False),
        (50, Mode.PLAIN, False), (25, Mode.FOLDED, True), (50, Mode.FOLDED, True),
    ]  # fmt: skip
    assert [c.exportable("plain") for c in cands] == [False, False, True, True, False, False]
    assert cands[4].label == "N=25 alpha=0 folded gated"
    assert Candidate(1, 0.5, "exact").mode is Mode.EXACT and f"{Mode.EXACT}" == "exact"


def test_candidates_rejected_at_their_first_leak_are_lower_bounds(tmp_path):
    from exporter.card import search_section as _search_section

    early = _s(10, 0.04, 0.001)  # its first attack leaked 4%: rejected, the other attacks never ran
    early.complete = False
    full = [_s(50, 0.0, 0.01), _s(70, 0.02, 0.005)]
    # a lower bound is no front point
    assert [s.candidate.n for s in pareto_front([early, *full])] == [
        70,
        50,
    ]
    assert choose([early, *full], Targets(0.0))[0].candidate.n == 50
    assert _marked(plot_front([early, *full], full[0], Targets(0.0), tmp_path / "front.png")) > 50
    search = {
        "chosen": full[0].to_json(),
        "candidates": [early.to_json(), full[0].to_json()],
        "met": True,
        "target": 0.0,
    }
    text = _search_section(search)
    assert "| ≥4% | ≥4% |" in text and "| 0% | 0% |" in text and "lower bound" in text
    assert "cross-fitted" not in text
    assert "cut into 2 parts" in _search_section({**search, "folds": 2})


def test_targets_finer_than_one_validation_person_are_named():
    # Gemma's demo: 1% of 50 validation people is nobody; 5% is two people, resolved
    (warning,) = Targets(0.01, 0.05).unresolved(50)
    assert warning.startswith("leakage_target 1% is finer than one of the 50 validation people")
    assert "(2%)" in warning
    assert "--people" in warning
    assert Targets(0.01, 0.05).unresolved(100) == []  # one person is 1%: resolved
    assert Targets(0.0, 0.0).unresolved(50) == []  # nobody out is always resolved
    assert len(Targets(0.01, 0.01).unresolved(50)) == 2
    assert Targets(0.01).unresolved(0) == []  # prefix values only: no people to count


def _row(attack, n, exact, username, pii_type="email"):
    return {"attack": attack, "pii_type": pii_type, "group": "validation", "n": n,
            "exact": exact, "username": username}  # fmt: skip


def test_parts_of_the_validation_split_pool_into_one_rate_per_attack():
    """Cross-fitting attacks each part with its own patch: an attack's rate over the whole split is
    the parts' leaks over the parts' sizes, and a part's leaks alone are a lower bound of it."""
    a = [_row("mailto", 10, 0.2, 0.3), _row("prefix32", 4, 0.0, 0.25)]
    b = [_row("mailto", 30, 0.0, 0.1), _row("prefix32", 6, 0.5, 0.5), _row("prefix8", 6, 0.5, 0.5)]
    rows = {r["attack"]: r for r in pooled([a, b])}
    assert rows["mailto"]["n"] == 40 and abs(rows["mailto"]["exact"] - 2 / 40) < 1e-12
    assert abs(rows["mailto"]["username"] - (3 + 3) / 40) < 1e-12
    assert abs(rows["prefix32"]["exact"] - 3 / 10) < 1e-12  # 0 of 4, 3 of 6
    assert rows["prefix8"]["n"] == 6 and rows["prefix8"]["exact"] == 0.5  # one part's attack
    assert worst_rates(pooled([a, b])) == (0.5, 0.5)
    assert worst_rates(pooled([a])) == (0.2, 0.3)  # one part: its own rows
    # 2 of 10 leaked, up to 30 more attacked elsewhere: at least 2 of 40 over the whole split
    low = diluted(a[0], others=30)
    assert abs(low["exact"] - 2 / 40) < 1e-12 and low["exact"] <= rows["mailto"]["exact"]
    assert Targets(0.04).broken_by(low) and not Targets(0.05).broken_by(low)
    assert diluted(a[0], others=0) == a[0]
    # the same attack sampled is another row
    sampled = [{**r, "decoding": "sampled x4"} for r in a]
    assert len(pooled([a, sampled])) == 2 * len(a)
