"""Next-token scoring over right-padded batches (lm.py)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from exporter.lm import next_token_nll, padding_side, right_padded, target_mask

TEXTS = ["a short one", "a somewhat longer text about names and values", "mid length text"]


def test_padding_side_is_restored_even_when_the_block_fails(tiny_tokenizer):
    tiny_tokenizer.padding_side = "left"
    with pytest.raises(RuntimeError):
        with padding_side(tiny_tokenizer, "right"):
            assert tiny_tokenizer.padding_side == "right"
            raise RuntimeError
    assert tiny_tokenizer.padding_side == "left"


def test_batches_are_right_padded_whatever_the_tokenizer_default(tiny_tokenizer):
    tiny_tokenizer.padding_side = "left"
    batches = list(right_padded(tiny_tokenizer, TEXTS, max_length=8, batch_size=2))
    assert [len(b["input_ids"]) for b in batches] == [2, 1]
    mask = batches[0]["attention_mask"]
    assert mask.shape[1] <= 8 and bool(mask[:, 0].all())  # real tokens first, pads after
    assert torch.equal(mask, mask.cummin(dim=1).values)
    assert tiny_tokenizer.padding_side == "left"
    # The targets are the real tokens after the first: pads never count.
    assert torch.equal(target_mask(batches[0]), mask[:, 1:].bool())


def test_next_token_nll_sums_the_cross_entropy_of_real_targets(tiny_tokenizer):
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    enc = next(right_padded(tiny_tokenizer, TEXTS, max_length=16, batch_size=3))
    with torch.no_grad():
        logits = model(**enc).logits
    total, n = next_token_nll(logits, enc)
    want, count = 0.0, 0
    for row in range(3):  # one text at a time, no padding at all
        ids = enc["input_ids"][row][enc["attention_mask"][row].bool()]
        want += float(F.cross_entropy(logits[row, : len(ids) - 1], ids[1:], reduction="sum"))
        count += len(ids) - 1
    assert n == count and total == pytest.approx(want, rel=1e-5)
