"""The leakage / utility harness on a tiny model."""

import pytest
from conftest import tiny_model

from exporter.data.people import Person
from exporter.evaluate.harness import leakage_rows, utility_metrics, worst


def test_leakage_rows_cover_every_attack(tiny_tokenizer):
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    people = [Person(f"Person {c}", f"p{c}@example.com", "214-555-0100") for c in "ABCDE"]
    rows = leakage_rows(
        model,
        tiny_tokenizer,
        {"memorised": people, "never_seen": people[:3], "empty": []},
        few_shot=2,
        samples=2,
        max_new_tokens=4,
    )
    attacks = {(r["group"], r["attack"], r["decoding"]) for r in rows}
    assert ("memorised", "mailto+2shot", "greedy") in attacks and (
        "memorised",
        "mailto",
        "sampled x2",
    ) in attacks
    assert ("memorised", "phone_of", "greedy") in attacks
    assert not [r for r in rows if r["group"] == "empty"]
    # never-seen people measure the guessing level: the zero-shot and phone templates only
    assert {(a, d) for g, a, d in attacks if g == "never_seen"} == {
        (a, "greedy") for a in ("mailto", "email_of", "name_email", "phone_of", "name_phone")
    }
    # A random tiny model recites nobody's address.
    assert worst(rows, "memorised") == 0.0 and all(0 <= r["exact"] <= 1 for r in rows)


def test_utility_metrics_of_identical_models(tiny_tokenizer):
    model = tiny_model("gpt2", vocab_size=len(tiny_tokenizer))
    texts = [
        "Objects are Python's abstraction for data.",
        "Every object has an identity, a type and a value.",
    ]
    out = utility_metrics(model, tiny_tokenizer, texts, prompts=texts, speed=True)
    assert out["kl"] == pytest.approx(0.0, abs=1e-7)
    assert out["perplexity"] > 1 and out["tokens_per_s"] > 0 and 0 < out["distinct_2"] <= 1


def test_cast_copy_casts_a_copy_and_keeps_the_patch_fp32(
    tiny_tokenizer, tmp_path, monkeypatch, native_bf16
):
    import torch

    from exporter.models import LoadedModel, architecture_of, cast_copy, load_checkpoint
    from exporter.patch import build_patch, steering_vector
    from exporter.patch.export import write_export
    from exporter.sae import TopKSAE

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    assert cast_copy(model, "float32") is model
    torch.manual_seed(0)
    sae = TopKSAE(32, 128, 8)
    patch = build_patch(
        sae, [1, 2, 3], mode="exact", steer=steering_vector(sae, torch.randn(128), 0.2, 3.0)
    )
    loaded = LoadedModel(model, tiny_tokenizer, architecture_of(model), "tiny", None)
    write_export(loaded, patch, 1, tmp_path / "out", meta={"alpha": 0.2})
    tiny_tokenizer.save_pretrained(tmp_path / "out")
    export, tok = load_checkpoint(str(tmp_path / "out"))
    cast = cast_copy(export, "bfloat16")
    assert cast.model.embed_tokens.weight.dtype == torch.bfloat16
    assert {b.dtype for b in cast.scalpel_patch.buffers()} <= {torch.float32, torch.long}
    assert next(export.parameters()).dtype == torch.float32  # the original is untouched
    people = [Person(f"Person {c}", f"p{c}@example.com") for c in "ABC"]
    rows = leakage_rows(cast, tok, {"all": people}, max_new_tokens=3, phones=False)
    assert len(rows) == 3 and all(r["exact"] == 0.0 for r in rows)


def test_leakage_rows_stop_at_the_first_row_the_callback_flags(tiny_tokenizer):
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    people = [Person(f"Person {c}", f"p{c}@example.com") for c in "ABCD"]
    kw = dict(few_shot=1, max_new_tokens=3, phones=False)
    every = leakage_rows(model, tiny_tokenizer, {"v": people}, **kw)
    seen = []
    flagged = leakage_rows(
        model, tiny_tokenizer, {"v": people}, stop=lambda r: seen.append(r) or len(seen) == 2, **kw
    )
    assert len(every) == 6 and flagged == every[:2]
    assert leakage_rows(model, tiny_tokenizer, {"v": people}, stop=lambda r: False, **kw) == every


def test_adversarial_attacks_have_rows_of_their_own_and_score_what_comes_out(
    tiny_tokenizer, monkeypatch
):
    """A fake model that recites an address only when asked in JSON or when handed its first
    characters: the JSON and prefix rows say 100%, every other row 0%, and none of them mixes into
    the plain greedy rows."""
    from exporter.evaluate import harness
    from exporter.evaluate.leakage import ADVERSARIAL_TEMPLATES, MANY_SAMPLES, PREFIX_CHARS

    people = [Person(f"Person {c}", f"p{c}x@example.com") for c in "ABCD"]

    def recite(model, tokenizer, prompts, n=24, progress=False):
        out = []
        for q in prompts:
            who = next(p for p in people if p.name in q)
            if q.startswith('{"name"'):
                out.append(who.email + '"}')
            elif q.endswith(who.email[:PREFIX_CHARS]):
                out.append(who.email[PREFIX_CHARS:] + "]")
            else:
                out.append(" nobody@nowhere.org")
        return out

    asked = []

    def sample(model, tokenizer, prompts, *, samples, max_new_tokens, seed):
        asked.append(samples)
        return [["nothing"] * samples for _ in prompts]

    monkeypatch.setattr(harness, "greedy_continuations", recite)
    monkeypatch.setattr(harness, "sampled_continuations", sample)
    rows = leakage_rows(None, tiny_tokenizer, {"test": people}, phones=False, adversarial=True)
    adv = {r["attack"]: r for r in rows if r["decoding"] == "adversarial greedy"}
    assert set(adv) == set(ADVERSARIAL_TEMPLATES) | {f"prefix{PREFIX_CHARS}"}
    assert adv["json"]["exact"] == 1.0 and adv[f"prefix{PREFIX_CHARS}"]["exact"] == 1.0
    assert all(
        r["exact"] == 0.0
        for name, r in adv.items()
        if name not in ("json", f"prefix{PREFIX_CHARS}")
    )
    # the plain rows stay apart
    assert worst([r for r in rows if r["decoding"] == "greedy"], "test") == 0.0
    assert MANY_SAMPLES in asked and [
        r for r in rows if r["decoding"] == f"adversarial sampled x{MANY_SAMPLES}"
    ]
    # off unless asked
    assert not [
        r
        for r in leakage_rows(None, tiny_tokenizer, {"test": people}, phones=False)
        if r["decoding"].startswith("adversarial")
    ]
