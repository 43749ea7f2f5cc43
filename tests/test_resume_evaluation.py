"""An interrupted final evaluation resumes with the variant it was on: each finished variant's
results are kept in the stage's partial folder (keyed by content), and a kept relearning variant is
never tuned again."""

import json

import pytest
from conftest import tiny_model

from exporter.data.people import Person
from exporter.recipe import EvalSection
from exporter.run.context import RunContext
from exporter.run.evaluation import Setting, Variant, evaluate_variants
from exporter.run.stage import EVALUATE


class Interrupted(Exception):
    pass


def _setting() -> Setting:
    people = [Person(f"Person {c}", f"p{c}@example.com") for c in "ABC"]
    ev = EvalSection(max_new_tokens=3, few_shot=0, samples=0, adversarial=False, dtype="float32")
    texts = ["The quick brown fox jumps over the lazy dog.", "Lists hold items in order."]
    return Setting({"test": people}, texts, ["The quick brown"], ev)


def test_a_killed_evaluation_resumes_from_the_variants_it_finished(tmp_path, tiny_tokenizer):
    base = tiny_model("llama", vocab_size=tiny_tokenizer.vocab_size)
    edited = tiny_model("llama", vocab_size=tiny_tokenizer.vocab_size, seed=1)
    built = []

    def tune():  # stands in for a relearning fine-tune: costly, so only when needed
        built.append(1)
        return edited

    def dies():
        raise Interrupted

    key = EVALUATE.key("some content")
    kept = EVALUATE.partial(tmp_path, key)
    setting, log = _setting(), []
    ctx_kw = dict(layer=1, kept=kept)
    ctx = RunContext(tmp_path, progress=False, log=log.append)
    first = [
        Variant("base"),
        Variant("relearned on prose", build=tune),
        Variant("next", build=dies),
    ]
    with pytest.raises(Interrupted):
        evaluate_variants(base, tiny_tokenizer, first, setting, ctx=ctx, **ctx_kw)
    assert built == [1]
    # the two finished variants are on disk, under file-safe names; nothing half-written
    assert sorted(p.name for p in kept.iterdir()) == ["base.json", "relearned-on-prose.json"]
    done = {p.stem: json.loads(p.read_text()) for p in kept.iterdir()}

    log.clear()
    again = [
        Variant("base"),
        Variant("relearned on prose", build=tune),
        Variant("next", model=edited),
    ]
    out = evaluate_variants(base, tiny_tokenizer, again, setting, ctx=ctx, **ctx_kw)
    assert built == [1]  # the kept relearning variant was not tuned again
    assert out["base"] == done["base"] and out["relearned on prose"] == done["relearned-on-prose"]
    assert [m for m in log if "kept from an earlier" in m] == [
        "final evaluation: base (kept from an earlier, interrupted run)",
        "final evaluation: relearned on prose (kept from an earlier, interrupted run)",
    ]
    # the variant measured now is the edited model: its KL against the base is not zero
    assert out["next"]["utility"]["kl"] > 0 and out["base"]["utility"]["kl"] == pytest.approx(0)
    assert (kept / "next.json").exists()


def test_partial_results_live_in_the_stage_folder_and_go_with_a_new_key_or_the_save(tmp_path):
    old = EVALUATE.partial(tmp_path, "k1")
    (old / "base.json").write_text("{}")
    assert old.parent == EVALUATE.folder(tmp_path) and EVALUATE.partial(tmp_path, "k1") == old
    assert (old / "base.json").exists()  # the same key resumes
    new = EVALUATE.partial(tmp_path, "k2")
    assert not old.exists() and new.exists()  # another key: what the old one kept is dropped
    with EVALUATE.saving(tmp_path, "k2") as tmp:
        (tmp / "evaluation.json").write_text(json.dumps({"done": True}))
    assert EVALUATE.cached(tmp_path, "k2") and not new.exists()  # the finished stage replaced it
