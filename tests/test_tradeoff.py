from exporter.evaluate.tradeoff import Candidate, Scored, candidates, choose, pareto_front, plot_front


def _s(n, leak, kl):
    return Scored(Candidate(n, 0.0, "folded"), leak, leak, kl, 10 + kl)


def test_front_and_choice():
    pts = [_s(10, 0.30, 0.001), _s(25, 0.05, 0.004), _s(50, 0.0, 0.010), _s(60, 0.0, 0.020), _s(70, 0.2, 0.03)]
    assert [s.candidate.n for s in pareto_front(pts)] == [10, 25, 50]
    chosen, met = choose(pts, target=0.01)
    assert (chosen.candidate.n, met) == (50, True)
    chosen, met = choose(pts, target=0.10)
    assert (chosen.candidate.n, met) == (25, True)
    chosen, met = choose(pts[:1] + pts[4:], target=0.01)  # nobody meets it: the least leaky
    assert (chosen.candidate.n, met) == (70, False)
    assert len(candidates([25, 50], [0.0, 0.05], ["folded", "exact"])) == 8


def test_plot_front(tmp_path):
    pts = [_s(10, 0.3, 0.001), _s(50, 0.0, 0.01)]
    path = plot_front(pts, pts[1], 0.01, tmp_path / "front.png")
    assert path.stat().st_size > 1000


def test_candidates_not_attacked_are_never_chosen(tmp_path):
    from exporter.evaluate.tradeoff import meets

    pts = [_s(10, None, 0.001), _s(50, 0.0, 0.01), _s(70, 0.3, 0.002)]
    pts[0].username = None
    assert not meets(pts[0], 1.0) and meets(pts[1], 0.01)
    assert choose(pts, target=0.01)[0].candidate.n == 50
    assert [s.candidate.n for s in pareto_front(pts)] == [70, 50]
    assert plot_front(pts, pts[1], 0.01, tmp_path / "front.png").stat().st_size > 1000


def test_a_candidate_that_collapses_is_passed_over():
    quiet, loud = _s(50, 0.0, 0.001), _s(100, 0.0, 0.004)
    quiet.repetition, loud.repetition = 0.13, 0.05
    assert choose([quiet, loud], target=0.01)[0] is quiet  # no collapse check: least KL
    chosen, met = choose([quiet, loud], target=0.01, max_repetition=0.07)
    assert chosen is loud and met
    chosen, met = choose([quiet], target=0.01, max_repetition=0.07)  # only a collapsing one: not met
    assert chosen is quiet and not met


def test_candidates_rejected_at_their_first_leak_are_lower_bounds(tmp_path):
    from exporter.card import _search_section

    early = _s(10, 0.04, 0.001)  # its first attack leaked 4%: rejected, the other attacks never ran
    early.complete = False
    full = [_s(50, 0.0, 0.01), _s(70, 0.02, 0.005)]
    assert [s.candidate.n for s in pareto_front([early, *full])] == [70, 50]  # a lower bound is no front point
    assert choose([early, *full], target=0.0)[0].candidate.n == 50
    assert plot_front([early, *full], full[0], 0.0, tmp_path / "front.png").stat().st_size > 1000
    search = {"chosen": full[0].to_json(), "candidates": [early.to_json(), full[0].to_json()], "met": True,
              "target": 0.0}
    text = _search_section(search)
    assert "| ≥4% | ≥4% |" in text and "| 0% | 0% |" in text and "lower bound" in text
