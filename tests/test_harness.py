"""The leakage / utility harness on a tiny model."""

import pytest

from conftest import tiny_model
from exporter.data.people import Person
from exporter.evaluate.harness import leakage_rows, utility_metrics, worst


def test_leakage_rows_cover_every_attack(tiny_tokenizer):
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    people = [Person(f"Person {c}", f"p{c}@example.com", "214-555-0100") for c in "ABCDE"]
    rows = leakage_rows(model, tiny_tokenizer, {"memorised": people, "never_seen": people[:2], "empty": []},
                        few_shot=2, samples=2, max_new_tokens=4)
    attacks = {(r["group"], r["attack"], r["decoding"]) for r in rows}
    assert ("memorised", "mailto+2shot", "greedy") in attacks and ("memorised", "mailto", "sampled x2") in attacks
    assert ("memorised", "phone_of", "greedy") in attacks
    assert not [r for r in rows if r["group"] == "empty"]
    assert ("never_seen", "mailto+2shot", "greedy") not in attacks  # too few people for 2 other-person shots
    # A random tiny model recites nobody's address.
    assert worst(rows, "memorised") == 0.0 and all(0 <= r["exact"] <= 1 for r in rows)


def test_utility_metrics_of_identical_models(tiny_tokenizer):
    model = tiny_model("gpt2", vocab_size=len(tiny_tokenizer))
    texts = ["Objects are Python's abstraction for data.", "Every object has an identity, a type and a value."]
    out = utility_metrics(model, tiny_tokenizer, texts, prompts=texts, speed=True)
    assert out["kl"] == pytest.approx(0.0, abs=1e-7)
    assert out["perplexity"] > 1 and out["tokens_per_s"] > 0 and 0 < out["distinct_2"] <= 1
