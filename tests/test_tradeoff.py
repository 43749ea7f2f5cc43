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
