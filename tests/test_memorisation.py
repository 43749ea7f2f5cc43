"""Memorisation metrics (MA, EL_n and their span forms) on a tiny Llama before and after it
memorises two PII documents."""

from __future__ import annotations

import torch
from conftest import tiny_model

from exporter.data.synthetic import SyntheticConfig, make_corpus
from exporter.evaluate.memorisation import documents_of, memorisation_metrics, overlap
from exporter.methods.batches import encode, token_log_probs


def test_overlap_counts_generated_ngrams_found_in_the_truth():
    assert overlap([1, 2, 3, 4], [1, 2, 3, 4], 3) == 1.0
    assert overlap([1, 2, 3, 9], [1, 2, 3, 4], 3) == 0.5  # (1,2,3) found, (2,3,9) not
    assert overlap([7, 8], [1, 2, 3], 3) == 0.0
    assert overlap([5], [5], 3) == 1.0  # n shrinks to what both sides have


def test_documents_of_finds_the_documents_holding_each_value():
    docs, people = make_corpus(SyntheticConfig(n_memorised=4, n_never_seen=2, seed=5))
    mine = [p for p in people if p.split == "test"][:1]
    found = documents_of(docs, {mine[0].email.upper().lower()})
    assert found and all(mine[0].email in d.text for d in found)
    assert len(documents_of(docs, {mine[0].email.lower()}, limit=1)) == 1
    assert documents_of(docs, {"nobody@example.invalid"}) == []


def test_metrics_rise_from_chance_to_one_when_a_model_memorises_its_documents(tiny_tokenizer):
    docs, _ = make_corpus(
        SyntheticConfig(n_memorised=2, n_never_seen=1, texts_per_person=1, seed=2)
    )
    docs = [d for d in docs if d.spans][:2]
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    before = memorisation_metrics(model, tiny_tokenizer, docs, n=3, stride=2, horizon=12)
    ids, mask = encode(tiny_tokenizer, docs, 128)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        lp, keep = token_log_probs(model, ids, mask)
        loss = -(lp * keep).sum() / keep.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after = memorisation_metrics(model, tiny_tokenizer, docs, n=3, stride=2, horizon=12)
    assert before["documents"] == after["documents"] == 2
    assert before["ma"] < 0.2 and before["s_ma"] < 0.2 and before["el_3"] < 0.2
    assert after["ma"] > 0.95 and after["s_ma"] > 0.95
    assert after["el_3"] > 0.9 and after["s_el_3"] > 0.9
    assert memorisation_metrics(model, tiny_tokenizer, []) == {}
