"""The patch maths: exact equals the SAE formula, folded gates follow TopK, the attention sink is
spared by its norm."""

import pytest
import torch
from conftest import tiny_model

from exporter.patch import (
    GateBank,
    ScalpelPatch,
    agreement,
    attached,
    build_patch,
    calibrate_gates,
    patch_digest,
    steering_vector,
)
from exporter.patch.build import sink_norm
from exporter.sae import TopKSAE


def _sae(d=16, d_sae=64, k=4, seed=0, scale=1.3):
    torch.manual_seed(seed)
    sae = TopKSAE(d, d_sae, k, norm_scale=scale)
    with torch.no_grad():
        sae.b_enc.normal_(std=0.2)
        sae.b_pre.normal_(std=0.5)
    return sae


def test_exact_patch_is_the_formula():
    sae = _sae()
    x = torch.randn(300, 16) * 2
    A = [3, 7, 11, 40]
    v = torch.randn(64)
    s = steering_vector(sae, v, alpha=0.2, mean_norm=5.0)
    patch = build_patch(sae, A, s, mode="exact")
    z = sae.encode(x)
    w_dec = sae.W_dec.detach() / float(sae.norm_scale)
    expected = x - z[:, A] @ w_dec[A] + s
    torch.testing.assert_close(patch(x), expected, rtol=1e-5, atol=1e-5)
    # alpha is relative: |s| = alpha * mean_norm, along -W_dec^T v.
    assert abs(float(s.norm()) - 1.0) < 1e-5
    u = v @ w_dec
    assert float(torch.nn.functional.cosine_similarity(s, -u, dim=0)) > 0.9999


def test_folded_gates_agree_with_topk_on_heldout():
    sae = _sae(seed=1)
    calib, held = torch.randn(20000, 16) * 2, torch.randn(5000, 16) * 2
    A = list(range(0, 64, 4))
    exact = build_patch(sae, A, mode="exact")
    folded = build_patch(sae, A, mode="folded", gates=calibrate_gates(sae, calib, A))
    report = agreement(exact, folded, held)
    assert report["gate_agreement"] > 0.95, report  # random data: the worst case for a fixed gate
    assert report["tokens"] == 5000
    # Without calibration (gate at 0: every positive pre-activation passes) agreement is worse.
    naive = build_patch(sae, A, mode="folded", gates=torch.zeros(len(A)))
    assert agreement(exact, naive, held)["gate_agreement"] < report["gate_agreement"]
    # Gates are per latent: a bank fitted on a superset gives the same gates for a subset.
    bank = GateBank(sae, calib)
    bank.warm(range(64))
    assert torch.equal(bank(A), calibrate_gates(sae, calib, A))
    # Folded holds only the rows of A.
    assert folded.enc_weight.shape == (len(A), 16) and exact.enc_weight.shape == (64, 16)


def test_empty_patch_is_identity_and_bad_sets_refused():
    sae = _sae()
    x = torch.randn(10, 16)
    for mode in ("exact", "folded"):
        patch = build_patch(sae, [], mode=mode, gates=torch.zeros(0))
        assert torch.equal(patch(x), x)
    with pytest.raises(ValueError, match="repeated"):
        build_patch(sae, [1, 1], mode="exact")
    with pytest.raises(ValueError, match="0..63"):
        build_patch(sae, [64], mode="exact")
    with pytest.raises(ValueError, match="needs gates"):
        build_patch(sae, [1], mode="folded")
    with pytest.raises(ValueError, match="mode"):
        ScalpelPatch(16, 1, "fast")


def test_sink_rule_spares_tokens_by_norm_and_fails_safe():
    sae = _sae()
    patch = build_patch(sae, [], torch.ones(16), mode="exact", sink=10.0)
    x = torch.randn(5, 16)
    x[1] *= 100 / x[1].norm()  # an attention sink: far above the SAE's range
    x[3] = float("nan")  # a token whose norm cannot be compared: patched (fail safe)
    moved = ~torch.isclose(patch(x), x).all(dim=-1)
    assert moved.tolist() == [True, False, True, True, True]
    assert torch.equal(patch(x)[1], x[1])
    # No recorded sink: every token is patched.
    assert bool((build_patch(sae, [], torch.ones(16), mode="exact")(x) != x)[:, 0].all())
    # The threshold is the range SAE training keeps: factor x the median norm of its sample (factor
    # 0: no limit).
    sample = torch.randn(1001, 16)
    sample[7] *= 1000  # a sink in the sample does not move the median
    assert sink_norm(sample, 20.0) == pytest.approx(20 * float(sample.norm(dim=1).median()))
    assert sink_norm(sample, 0.0) == float("inf")
    assert GateBank(sae, sample, outlier_factor=20.0).sink_norm == sink_norm(sample, 20.0)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_attached_patch_is_a_pure_function_of_the_layer_output(model_type):
    from exporter.models import architecture_of, layer_output_hook

    model = tiny_model(model_type)
    layers = architecture_of(model).decoder_layers(model)
    sae = _sae(d=32, d_sae=64, k=4)
    ids = torch.randint(0, 128, (2, 6))
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    seen = {}
    with (
        torch.no_grad(),
        layer_output_hook(model, 1, lambda h: seen.__setitem__("plain", h.clone())),
    ):
        model(input_ids=ids, attention_mask=mask)
    norms = seen["plain"].norm(dim=-1)
    sink = float(norms.median())  # half the tokens count as sinks here, to see the rule at work
    patch = build_patch(
        sae, [], steering_vector(sae, torch.randn(64), 0.5, 4.0), mode="exact", sink=sink
    )
    cls = type(layers[1])
    with torch.no_grad():
        with attached(model, 1, patch):
            # the layer's own kind, patched
            assert type(layers[1]) is not cls and isinstance(layers[1], cls)
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    patched = out.hidden_states[2]  # recorded by transformers: the patched layer's output
    torch.testing.assert_close(patched, patch(seen["plain"]))
    moved = (patched - seen["plain"]).norm(dim=-1) > 1e-6
    # pads and the first token included: only the norm decides
    assert torch.equal(moved, norms <= sink)
    # Removed afterwards: the layer's own class again and no patch module; no hook was ever ours.
    assert type(layers[1]) is cls and not hasattr(layers[1], "scalpel_patch")
    assert not model._forward_pre_hooks
    with torch.no_grad(), attached(model, 1, patch), pytest.raises(ValueError, match="already"):
        with attached(model, 1, patch):
            pass


def test_digest_tracks_every_tensor():
    sae = _sae()
    patch = build_patch(sae, [1, 2], mode="exact")
    before = patch_digest(patch)
    assert patch_digest(build_patch(sae, [1, 2], mode="exact")) == before
    with torch.no_grad():
        patch.enc_bias[0] += 1e-6
    assert patch_digest(patch) != before


def test_forward_is_h_plus_delta_and_skips_the_latents_when_the_gate_is_shut(monkeypatch):
    sae = _sae()
    A, steer, w = [1, 2, 3], torch.randn(16), torch.randn(16)
    for mode in ("exact", "folded"):
        gates = calibrate_gates(sae, torch.randn(2000, 16) * 2, A) if mode == "folded" else None
        gated = build_patch(sae, A, steer, mode=mode, gates=gates, context=(w, 0.5))
        h = torch.randn(4, 9, 16) * 2
        torch.testing.assert_close(gated(h), h + gated.delta(h), rtol=1e-6, atol=1e-6)
        # A decoding step far from personal data: the gate is shut on every token, h passes through
        # untouched and the latents (the exact mode's whole encoder) are never computed.
        # w . shut + 0.5 = -0.5 everywhere
        shut = h - (h @ w).unsqueeze(-1) * w / w.dot(w) - w / w.dot(w)
        assert not bool(gated.context(shut).any())
        monkeypatch.setattr(
            gated, "latents", lambda _x: (_ for _ in ()).throw(AssertionError("latents computed"))
        )
        assert gated(shut) is shut
        monkeypatch.undo()


def test_context_gate_restricts_the_change_and_is_fitted_for_recall():
    from exporter.features import context_positives
    from exporter.patch import fit_context_gate

    sae = _sae()
    x = torch.randn(400, 16) * 2
    A = [1, 2, 3]
    steer = torch.randn(16)
    plain = build_patch(sae, A, steer, mode="exact")
    w = torch.randn(16)
    gated = build_patch(sae, A, steer, mode="exact", context=(w, 0.5))
    open_ = x @ w + 0.5 > 0
    assert 0 < int(open_.sum()) < len(x)
    assert torch.allclose(gated.delta(x)[open_], plain.delta(x)[open_])
    assert torch.equal(gated.delta(x)[~open_], torch.zeros_like(x[~open_]))
    assert torch.equal(gated.context(x), open_) and bool(plain.context(x).all())
    assert patch_digest(gated) != patch_digest(
        build_patch(sae, A, steer, mode="exact", context=(w, 0.6))
    )
    # Fitting: positives live along one direction; the gate opens on at least `recall` of them and
    # on few negatives.
    g = torch.Generator().manual_seed(0)
    neg = torch.randn(2000, 16, generator=g)
    pos = torch.randn(200, 16, generator=g) + 4 * torch.nn.functional.one_hot(torch.tensor(3), 16)
    xs = torch.cat([neg, pos])
    y = torch.cat([torch.zeros(2000, dtype=torch.bool), torch.ones(200, dtype=torch.bool)])
    w, b = fit_context_gate(xs, y, recall=0.99)
    opened = xs @ w + b > 0
    assert float(opened[y].float().mean()) >= 0.99 and float(opened[~y].float().mean()) < 0.05
    with pytest.raises(ValueError, match="both"):
        fit_context_gate(xs, torch.zeros(len(xs), dtype=torch.bool))
    # A massive-activation dimension (Gemma's: a few dimensions hold most of the norm, with a large
    # spread that says nothing about PII) must not drown the small one the positives live along.
    massive = xs.clone()
    massive[:, 0] = 3000 + 500 * torch.randn(len(xs), generator=g)
    w, b = fit_context_gate(massive, y, recall=0.99, standardise=True)
    opened = massive @ w + b > 0
    assert float(opened[y].float().mean()) >= 0.99 and float(opened[~y].float().mean()) < 0.05
    w, b = fit_context_gate(massive, y, recall=0.99)  # scaled by the mean norm: drowned
    assert float(((massive @ w + b > 0)[~y]).float().mean()) > 0.5
    # Positives: PII tokens, the token before a span, and the `window` tokens before a span, within
    # the document.
    labels = {
        "pii": torch.tensor([0, 0, 0, 0, 1, 1, 0, 0, 0, 1], dtype=torch.bool),
        "pre_span": torch.tensor([0, 0, 0, 1, 0, 0, 0, 0, 1, 0], dtype=torch.bool),
        "span_start": torch.tensor([0, 0, 0, 0, 1, 0, 0, 0, 0, 1], dtype=torch.bool),
        "doc": torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1]),
    }
    assert context_positives(labels, 0).int().tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    assert context_positives(labels, 2).int().tolist() == [0, 0, 1, 1, 1, 1, 0, 1, 1, 1]
    labels["pii"][5] = False  # the window stops at the document boundary
    assert context_positives(labels, 4).int().tolist() == [1, 1, 1, 1, 1, 0, 1, 1, 1, 1]


def test_a_hidden_layer_gate_opens_where_its_score_is_positive_and_carves_what_a_line_cannot():
    """PII context where two features are both on, benign text where only one is, or neither: no
    half-space holds that quadrant at 99% recall without much of the benign text; a few ReLU units
    do. The fitted gate is the patch's (standardisation folded in), seeded, and kept by the
    features stage's fit."""
    from types import SimpleNamespace

    from exporter.patch import context_scores, fit_context_gate, fit_context_mlp
    from exporter.recipe import InterventionSection
    from exporter.run.analysis import fit_context

    g = torch.Generator().manual_seed(3)
    pos = torch.randn(600, 16, generator=g)
    pos[:, 3] += 3
    pos[:, 5] += 3
    neg = torch.randn(3000, 16, generator=g)
    neg[:1000, 3] += 6  # one feature on, the other off
    neg[:1000, 5] -= 2
    neg[1000:2000, 5] += 6
    neg[1000:2000, 3] -= 2
    xs = torch.cat([pos, neg])
    xs[:, 0] += 300  # an offset the standardisation must fold back
    y = torch.arange(len(xs)) < len(pos)
    linear = context_scores(fit_context_gate(xs, y, recall=0.99, standardise=True), xs) > 0
    gate = fit_context_mlp(xs, y, recall=0.99, hidden=8)
    mlp = context_scores(gate, xs) > 0
    assert float(linear[y].float().mean()) >= 0.99 and float(mlp[y].float().mean()) >= 0.99
    assert float(mlp[~y].float().mean()) * 5 < float(linear[~y].float().mean())
    again = fit_context_mlp(xs, y, recall=0.99, hidden=8)
    assert all(torch.equal(torch.as_tensor(u), torch.as_tensor(v)) for u, v in zip(gate, again))

    # The patch computes the same gate.
    sae = _sae()
    A, steer = [1, 2, 3], torch.randn(16)
    patch = build_patch(sae, A, steer, mode="exact", context=gate)
    assert patch.context_hidden == 8 and torch.equal(patch.context(xs), mlp)
    plain = build_patch(sae, A, steer, mode="exact")
    torch.testing.assert_close(patch.delta(xs)[mlp], plain.delta(xs)[mlp])
    assert torch.equal(patch.delta(xs)[~mlp], torch.zeros_like(xs[~mlp]))
    with pytest.raises(ValueError, match="at least one unit"):
        fit_context_mlp(xs, y, hidden=0)

    # The features stage's fit: the hidden-layer gate, its stats counted as the patch opens.
    latents = SimpleNamespace(acts=xs, labels=_pii_first_labels(len(xs), len(pos)), benign=~y)
    iv = InterventionSection(context_window=0, context_hidden=8)
    fitted, stats = fit_context(latents, iv)
    assert len(fitted) == 4 and stats["fit"] == "hidden layer" and stats["hidden"] == 8
    assert stats["recall"] >= 0.99
    assert stats["open_benign"] == float((context_scores(fitted, xs) > 0)[~y].float().mean())
    assert stats["open_benign"] * 5 < float(linear[~y].float().mean())


def _pii_first_labels(n: int, n_pii: int) -> dict:
    """Feature-pass labels of `n` tokens of one document whose first `n_pii` are PII, no span
    starts and no pre-span tokens (what the context gate fits on with window 0)."""
    return {
        "pii": torch.arange(n) < n_pii,
        "pre_span": torch.zeros(n, dtype=torch.bool),
        "span_start": torch.zeros(n, dtype=torch.bool),
        "doc": torch.zeros(n, dtype=torch.long),
    }


def test_auto_gate_fit_standardises_only_when_the_scaled_gate_opens_on_benign_text():
    from types import SimpleNamespace

    from exporter.recipe import InterventionSection
    from exporter.run.analysis import fit_context

    g = torch.Generator().manual_seed(1)
    n_pii, n_benign = 600, 1400
    x = torch.randn(n_pii + n_benign, 16, generator=g)
    x[:n_pii, 3] += 6  # PII context lives along one small direction
    labels = _pii_first_labels(len(x), n_pii)
    benign = torch.arange(len(x)) >= n_pii
    auto = InterventionSection(context_window=0)
    _, stats = fit_context(SimpleNamespace(acts=x, labels=labels, benign=benign), auto)
    assert stats["fit"] == "scaled" and stats["open_benign"] < 0.05
    massive = x.clone()
    massive[:, 0] = 3000 + 500 * torch.randn(len(x), generator=g)  # Gemma's kind of dimension
    latents = SimpleNamespace(acts=massive, labels=labels, benign=benign)
    _, stats = fit_context(latents, auto)
    assert stats["fit"] == "standardised" and stats["scaled_open_benign"] > 0.05
    assert stats["open_benign"] < 0.05 and stats["recall"] >= 0.99
    _, stats = fit_context(latents, InterventionSection(context_window=0, context_fit="scaled"))
    assert stats["fit"] == "scaled" and stats["open_benign"] > 0.05


def test_auto_gate_fit_standardises_under_the_limit_when_that_opens_on_ten_times_fewer():
    """A lower recall can bring the scaled gate under the 5% limit while it still opens on far more
    benign tokens than the standardised one (Gemma-3-270M at 90%: 4.46% against 0.04%)."""
    from types import SimpleNamespace

    from exporter.recipe import InterventionSection
    from exporter.run import analysis

    g = torch.Generator().manual_seed(1)
    n_pii, n_benign = 600, 1400
    x = torch.randn(n_pii + n_benign, 16, generator=g)
    x[:n_pii, 3:7] += 2.5
    x[:, 0] = 420 + 100 * torch.randn(len(x), generator=g)  # massive, but less than Gemma's
    labels = _pii_first_labels(len(x), n_pii)
    latents = SimpleNamespace(acts=x, labels=labels, benign=torch.arange(len(x)) >= n_pii)
    iv = InterventionSection(context_window=0, context_recall=0.9)
    _, scaled = analysis.fit_context(latents, iv.model_copy(update={"context_fit": "scaled"}))
    _, std = analysis.fit_context(latents, iv.model_copy(update={"context_fit": "standardised"}))
    assert 0.005 < scaled["open_benign"] < 0.05
    assert std["open_benign"] * 10 <= scaled["open_benign"]
    _, auto = analysis.fit_context(latents, iv)
    assert auto["fit"] == "standardised" and auto["open_benign"] == std["open_benign"]
    assert auto["scaled_open_benign"] == scaled["open_benign"]


def test_gate_fitted_on_benign_windows_stays_shut_on_text_like_them():
    from types import SimpleNamespace

    from exporter.recipe import InterventionSection
    from exporter.run.analysis import fit_context

    g = torch.Generator().manual_seed(2)
    n_pii, n_benign, n_windows = 600, 1400, 800
    x = torch.randn(n_pii + n_benign, 16, generator=g)
    x[:n_pii, 3] += 6  # PII context lives along one direction
    labels = _pii_first_labels(len(x), n_pii)
    # 100 other tokens of PII documents, then the paragraphs
    latents = SimpleNamespace(acts=x, labels=labels, benign=torch.arange(len(x)) >= n_pii + 100)
    # Text the paragraphs never show (code, tables): partly along the PII direction, told apart
    # by another one.
    windows = torch.randn(n_windows, 16, generator=g)
    windows[:, 3] += 4
    windows[:, 5] += 5
    iv = InterventionSection(context_window=0, context_fit="scaled")
    (w, b), plain = fit_context(latents, iv)
    (w2, b2), fitted = fit_context(latents, iv, windows)
    before = float((windows @ w + b > 0).float().mean())
    assert "open_windows" not in plain and before > 0.2
    assert fitted["open_windows"] == float((windows @ w2 + b2 > 0).float().mean())
    assert fitted["open_windows"] < before / 10
    assert fitted["recall"] >= 0.99 and fitted["open_benign"] < 0.05
    # The stats of the feature pass's own rows are over those rows only.
    assert fitted["tokens"] == len(x) + n_windows and plain["tokens"] == len(x)
    other = x[n_pii : n_pii + 100]
    assert fitted["open_other_pii_doc"] == float((other @ w2 + b2 > 0).float().mean())
    assert fitted["open_benign"] == float((x[n_pii + 100 :] @ w2 + b2 > 0).float().mean())
    # Prompts the corpus never shows, where a value is about to be written: the gate learns to open
    # on them too, and its windows stats stay over the windows' rows.
    prompts = torch.randn(200, 16, generator=g)
    prompts[:, 7] += 6
    assert float((prompts @ w2 + b2 > 0).float().mean()) < 0.2
    (w3, b3), asked = fit_context(latents, iv, windows, prompts)
    assert asked["open_prompts"] == float((prompts @ w3 + b3 > 0).float().mean()) >= 0.9
    assert asked["open_windows"] == float((windows @ w3 + b3 > 0).float().mean())
    assert asked["tokens"] == len(x) + n_windows + 200
