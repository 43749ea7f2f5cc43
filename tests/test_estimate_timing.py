"""The dry run's time estimate (FLOPs scaled by a measured reference run) and the per-stage wall
time and peak memory a run records."""

import json
import time
from dataclasses import replace
from functools import partial

import pytest
import torch

from exporter.estimate import (
    ADVERSARIAL_SECONDS_PER_PERSON,
    BUILTIN_PII_TOKENS,
    GPU_HOST_SECONDS,
    MEMORISATION_SECONDS_PER_DOC,
    REFERENCE_CONFIG,
    REFERENCE_GFLOPS,
    REFERENCE_LAYER,
    REFERENCE_SECONDS,
    SECOND_GFLOPS,
    estimate_seconds,
    forward_flops,
    machine_gflops,
    reference_sizes,
)
from exporter.plan import make_plan, run_sizes
from exporter.recipe import parse_recipe
from exporter.run.stage import Stage
from exporter.timing import TIMINGS, read_timings, timed

GEMMA3_270M = dict(
    model_type="gemma3_text",
    hidden_size=640,
    num_hidden_layers=18,
    intermediate_size=2048,
    vocab_size=262144,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
)


def test_the_reference_run_is_reproduced_and_scales_with_the_machine():
    sizes = reference_sizes()
    got = estimate_seconds(REFERENCE_CONFIG, REFERENCE_LAYER, sizes, REFERENCE_GFLOPS)
    expected = dict(REFERENCE_SECONDS)
    # the final evaluation of a distilled run distils the control patch too; the SAE stage is its
    # forward passes and its training, each at its own rate
    expected["evaluate"] += expected["distill"]
    expected["sae"] += expected.pop("sae_train")
    assert got == pytest.approx(expected)
    faster = estimate_seconds(REFERENCE_CONFIG, REFERENCE_LAYER, sizes, 4 * REFERENCE_GFLOPS)
    assert faster["sae"] == pytest.approx(got["sae"] / 4)
    # on a GPU, decoding one token at a time is never faster than its launch-bound floor
    gpu = estimate_seconds(REFERENCE_CONFIG, REFERENCE_LAYER, sizes, 1e6, device="cuda")
    assert gpu["search"] > got["search"] * REFERENCE_GFLOPS / 1e6
    # the host's share stays (the probes' fits run on the CPU)
    assert gpu["probe"] >= GPU_HOST_SECONDS["probe"] > got["probe"] * REFERENCE_GFLOPS / 1e6


def test_gemma_head_dominates_and_doubles_the_generation_stages():
    layers = forward_flops(GEMMA3_270M, head=False)
    assert forward_flops(GEMMA3_270M) > 2 * layers  # the 262k-token head
    sizes = replace(reference_sizes(), d_sae=8 * 640)
    gemma = estimate_seconds(GEMMA3_270M, 8, sizes, REFERENCE_GFLOPS)
    assert gemma["search"] > 1.5 * REFERENCE_SECONDS["search"]
    assert gemma["probe"] < 1.5 * REFERENCE_SECONDS["probe"]  # no head: layers only


def test_the_sae_estimate_counts_its_forward_passes_and_the_dead_latents_auxk_decodes():
    """The spliced cross-entropy runs the whole model, head included (Gemma's 262k-token head),
    and each latent AuxK decodes per token adds to the training step."""
    sizes = replace(reference_sizes(), d_sae=8 * 640)
    est = partial(estimate_seconds, GEMMA3_270M, 4, gflops=SECOND_GFLOPS)
    no_ce = est(replace(sizes, ce_tokens=0))["sae"]
    assert est(sizes)["sae"] > no_ce + 30  # a third of Gemma's forward-pass seconds
    more_aux = est(replace(sizes, aux_latents=256))["sae"]
    assert more_aux > est(sizes)["sae"] + 100  # Gemma's 20% dead: about 190 a token


def test_the_evaluation_estimate_counts_every_model_it_attacks_and_each_attack():
    """Each attacked model costs the same again; the adversarial attacks and the memorisation
    metrics add their measured seconds per test person and per document to each, scaled by the
    model's forward and the machine's rate."""
    plain = replace(reference_sizes(), distill_tokens=0)
    est = partial(estimate_seconds, REFERENCE_CONFIG, REFERENCE_LAYER)
    one = est(plain, SECOND_GFLOPS)["evaluate"]
    assert est(replace(plain, variants=6), SECOND_GFLOPS)["evaluate"] == pytest.approx(2 * one)
    adversarial = est(replace(plain, adversarial=True), SECOND_GFLOPS)["evaluate"] - one
    assert adversarial == pytest.approx(3 * ADVERSARIAL_SECONDS_PER_PERSON * plain.people / 3)
    docs = est(replace(plain, memorisation_docs=20), 2 * SECOND_GFLOPS)["evaluate"] - one / 2
    assert docs == pytest.approx(3 * MEMORISATION_SECONDS_PER_DOC * 20 / 2)
    gemma = estimate_seconds(GEMMA3_270M, 8, replace(plain, memorisation_docs=20), SECOND_GFLOPS)
    smol = est(replace(plain, memorisation_docs=20), SECOND_GFLOPS)
    assert gemma["evaluate"] > 1.5 * smol["evaluate"]  # the 262k-token head in every decoding step


def test_machine_rate_is_measured_on_a_cpu():
    gflops, measured = machine_gflops("cpu", n=256, repeats=2)
    assert measured and gflops > 0.1


def _distilling(recipe, **settings):
    """`recipe` with `export.distill` settings changed."""
    distill = recipe.export.distill.model_copy(update=settings)
    return recipe.model_copy(
        update={"export": recipe.export.model_copy(update={"distill": distill})}
    )


def test_dry_run_of_the_demo_times_every_stage_including_the_leaky_fine_tune(tmp_path):
    cfg = {**GEMMA3_270M, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    recipe = parse_recipe(
        {
            "model": {"path": str(tmp_path)},
            "data": {"pii": {"builtin": "synthetic"}, "people": {"builtin": "synthetic"}},
            "export": {"mode": "distilled"},
        }
    )
    plan = make_plan(recipe)
    names = [s for s, _ in plan.stages]
    assert names[0] == "leaky" and "distill" in names and set(plan.seconds) == set(names)
    assert plan.measured and plan.gflops > 0
    # the later layers' phase (defence in depth) is planned and costs time on top
    plan_deep = make_plan(_distilling(recipe, late_steps=150))
    assert "150 steps on the layers after it" in dict(plan_deep.stages)["distill"]
    ratio = plan_deep.seconds["distill"] / plan.seconds["distill"]
    assert ratio * plan_deep.gflops / plan.gflops > 1.5, ratio  # in FLOPs: each plan times its own
    # adapters on every layer up to l: each step runs through all of them, not the last 4
    plan_every = make_plan(_distilling(recipe, adapted_layers=0))
    assert "on the last 4 layers up to" in dict(plan.stages)["distill"]
    assert "on every layer up to" in dict(plan_every.stages)["distill"]
    ratio = plan_every.seconds["distill"] / plan.seconds["distill"]
    assert ratio * plan_every.gflops / plan.gflops > 2, ratio
    # hardening: the ranking (once) and the repair on top of the student; the control's
    # distillation, in the final evaluation, repairs again but reads the ranking back
    from exporter.recipe.exports import HardenSection

    plan_hard = make_plan(_distilling(recipe, harden=HardenSection(neurons=400)))
    assert "then hardened: 400 privacy neurons" in dict(plan_hard.stages)["distill"]
    scale = plan.gflops / plan_hard.gflops
    more = {k: plan_hard.seconds[k] / scale - plan.seconds[k] for k in ("distill", "evaluate")}
    assert more["distill"] > more["evaluate"] > 0.1 * plan.seconds["distill"], more
    # with a reference, nothing is ranked: only the repair, on top of the student
    plan_ref = make_plan(_distilling(recipe, harden=HardenSection(reference="model")))
    assert "set to model's, their MLPs repaired for 150 steps" in dict(plan_ref.stages)["distill"]
    scale = plan.gflops / plan_ref.gflops
    repair = plan_ref.seconds["distill"] / scale - plan.seconds["distill"]
    assert 0 < repair < more["distill"], (repair, more)
    # the key directions: found once (a forward of each text), then the same repair
    keys = HardenSection(reference="model", directions=512, documents=200)
    plan_keys = make_plan(_distilling(recipe, harden=keys))
    assert (
        "undone along the 512 input directions PII uses most (found on 200 PII documents)"
        in (dict(plan_keys.stages)["distill"])
    )
    burst = keys.model_copy(update={"lr": 3e-4, "burst": 20, "settle_lr": 1e-4})
    assert (
        "repaired for 150 steps (the first 20 at lr 0.0003, then 0.0001)"
        in (dict(make_plan(_distilling(recipe, harden=burst)).stages)["distill"])
    )
    light = burst.model_copy(update={"benign_weight": 1.0})
    assert (
        "(the first 20 at lr 0.0003, then 0.0001), benign text at weight 1"
        in (dict(make_plan(_distilling(recipe, harden=light)).stages)["distill"])
    )
    scale = plan.gflops / plan_keys.gflops
    found = plan_keys.seconds["distill"] / scale - plan.seconds["distill"] - repair
    assert 0 < found < repair, (found, repair)


def test_the_distillation_estimate_counts_the_teachers_pass_over_the_training_text(tmp_path):
    """Each student's teacher pass runs over every training text once, whatever the steps: the
    built-in corpus's tokens as measured, a user's corpus by its size (fewer with the validation
    people's documents only)."""
    (tmp_path / "config.json").write_text(json.dumps(REFERENCE_CONFIG))
    demo = {"pii": {"builtin": "synthetic"}, "people": {"builtin": "synthetic"}}
    recipe = parse_recipe({"model": {"path": str(tmp_path)}, "data": demo,
                           "export": {"mode": "distilled"}})  # fmt: skip
    sizes = run_sizes(recipe, 8 * 576)
    assert sizes.teacher_tokens == reference_sizes().teacher_tokens
    assert sizes.distill_tokens == reference_sizes().distill_tokens
    rate = {}
    for steps in (300, 1):
        plan = make_plan(_distilling(recipe, steps=steps))
        rate[steps] = plan.seconds["distill"] * plan.gflops  # seconds at one machine rate
    # one step leaves the teacher's pass: about a fifth of the demo's distillation in FLOPs
    assert 0.1 < rate[1] / rate[300] < 0.4, rate
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": f"Mail {i} to a{i}@b.com"}) + "\n" for i in range(1000))
    )
    prose = tmp_path / "prose.txt"
    prose.write_text("word " * 100_000)  # 500 kB: 400 training windows of 1,000 characters
    own = parse_recipe(
        {
            "model": {"path": str(tmp_path)},
            "data": {"pii": {"path": str(corpus)}, "benign": {"path": str(prose)}},
            "export": {"mode": "distilled"},
        }
    )
    got = run_sizes(own, 8 * 576).teacher_tokens
    assert got == corpus.stat().st_size // 4 + 400 * 128
    fewer = run_sizes(_distilling(own, documents="validation"), 8 * 576).teacher_tokens
    assert fewer == corpus.stat().st_size // 4 // 3 + 400 * 128


def test_timed_records_a_computed_stage_and_not_a_cached_load(tmp_path):
    stage = Stage("probe", 1, outputs=("x",))
    with timed(tmp_path, "probe", stage):
        with stage.saving(tmp_path, "k1") as tmp:
            (tmp / "x").write_text("1")
            big = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB held inside the stage
            big += 1
    first = read_timings(tmp_path)["probe"]
    assert first["peak_rss_gib"] >= first["rss_before_gib"] + 0.05
    with timed(tmp_path, "probe", stage):  # the same key: a cached load
        assert stage.cached(tmp_path, "k1")
    assert read_timings(tmp_path)["probe"] == first
    with timed(tmp_path, "export"):  # no stage: always recorded
        pass
    assert set(json.loads((tmp_path / TIMINGS).read_text())) == {"probe", "export"}


def test_timed_records_a_search_that_scored_candidates_and_not_one_that_read_them(tmp_path):
    # the trade-off search keeps a file per candidate and no key file of its own
    search = Stage("search", 1, summaries=("search.json",))
    with timed(tmp_path, "search", search):
        search.folder(tmp_path).mkdir(parents=True)
        (search.folder(tmp_path) / "cand.json").write_text("{}")
        (search.folder(tmp_path) / "search.json").write_text("{}")
    first = read_timings(tmp_path)["search"]
    # a cached search reads its candidates and writes its summary again
    with timed(tmp_path, "search", search):
        (search.folder(tmp_path) / "cand.json").read_text()
        time.sleep(0.01)
        (search.folder(tmp_path) / "search.json").write_text('{"again": 1}')
    assert read_timings(tmp_path)["search"] == first
    with timed(tmp_path, "search", search):  # a new candidate scored: recorded
        time.sleep(0.2)
        (search.folder(tmp_path) / "cand2.json").write_text("{}")
    assert read_timings(tmp_path)["search"]["seconds"] >= 0.2 > first["seconds"]


def test_the_features_estimate_counts_the_benign_windows_the_gate_is_fitted_on(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(REFERENCE_CONFIG))
    demo = {"pii": {"builtin": "synthetic"}, "people": {"builtin": "synthetic"}}

    def recipe(**intervention):
        return parse_recipe(
            {"model": {"path": str(tmp_path)}, "data": demo, "intervention": intervention}
        )

    assert run_sizes(recipe(), 8 * 576).gate_window_tokens == 0
    assert run_sizes(recipe(context_gate=[False], context_negatives="windows"), 8 * 576) == (
        run_sizes(recipe(), 8 * 576)
    )
    windows = run_sizes(recipe(context_negatives="windows"), 8 * 576)
    # pydoc's 352 training windows, each cut at twice the data's 128-token limit (about 203 each)
    assert windows.gate_window_tokens == 352 * 203
    plain, more = (make_plan(recipe()), make_plan(recipe(context_negatives="windows")))
    ratio = (more.seconds["features"] * more.gflops) / (plain.seconds["features"] * plain.gflops)
    assert ratio == pytest.approx((30_000 + 352 * 203) / 30_000)


def test_the_search_estimate_counts_its_sampled_attacks(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(REFERENCE_CONFIG))
    demo = {"pii": {"builtin": "synthetic"}, "people": {"builtin": "synthetic"}}

    def plan(**intervention):
        return make_plan(
            parse_recipe(
                {"model": {"path": str(tmp_path)}, "data": demo, "intervention": intervention}
            )
        )

    # each plan measures this machine's rate: compare work, not seconds
    greedy, sampled = (
        {k: v * p.gflops for k, v in p.seconds.items()} for p in (plan(), plan(search_samples=4))
    )
    # the search's decoding doubles (one greedy pass, four samples at a quarter's cost each); its
    # KL does not change, and neither does any other stage
    assert greedy["search"] < sampled["search"] < 2 * greedy["search"]
    assert {k: v for k, v in sampled.items() if k != "search"} == pytest.approx(
        {k: v for k, v in greedy.items() if k != "search"}
    )


def test_the_estimate_scales_with_the_synthetic_corpus_size(tmp_path):
    """Twice the memorised people: twice the leaky fine-tune's tokens and the distillation's PII
    documents, and 250 people attacked instead of 150."""
    (tmp_path / "config.json").write_text(json.dumps(REFERENCE_CONFIG))

    def sizes(memorised):
        pii = {"builtin": "synthetic", **({"memorised": memorised} if memorised else {})}
        data = {"pii": pii, "people": {"builtin": "synthetic"}}
        recipe = {"model": {"path": str(tmp_path)}, "data": data, "export": {"mode": "distilled"}}
        return run_sizes(parse_recipe(recipe), 8 * 576)

    default, double = sizes(None), sizes(200)
    assert (double.people, default.people) == (250, 150)
    # the search attacks the validation half of the memorised people, not a third of everyone
    assert (double.per_split, default.per_split) == (100, 50)
    assert double.leaky_tokens == 2 * default.leaky_tokens
    assert double.teacher_tokens - default.teacher_tokens == BUILTIN_PII_TOKENS
