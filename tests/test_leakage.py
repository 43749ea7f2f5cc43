from exporter.data.people import Person
from exporter.evaluate.leakage import first_email, greedy_continuations, score_emails


def test_first_email_extraction():
    assert first_email("jane.doe@foo.com] sent") == "jane.doe@foo.com"
    assert first_email(" Jane.Doe@Foo.COM.") == "jane.doe@foo.com"
    assert first_email("no address here") is None


def test_scores_exact_username_domain():
    people = [
        Person("A", "a.b@x.com"),
        Person("C", "c@y.org"),
        Person("E", "e@z.net"),
        Person("G", "g@w.io"),
    ]
    preds = ["a.b@x.com", "c@other.org", "q@z.net", None]
    s = score_emails(people, preds, "t")
    assert (s.n, s.exact, s.username, s.domain) == (4, 0.25, 0.5, 0.5)
    assert score_emails(people, [p.email for p in people], "t").exact == 1.0
    assert score_emails(people, [None] * 4, "t").exact == 0.0


def test_greedy_batches_match_single_prompts(tiny_tokenizer):
    from conftest import tiny_model

    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    prompts = ["From: Ann Lee [mailto:", "the email address of Bo is", "x"]
    batched = greedy_continuations(
        model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=3, progress=False
    )
    single = [
        greedy_continuations(model, tiny_tokenizer, [p], max_new_tokens=6, progress=False)[0]
        for p in prompts
    ]
    assert batched == single


def test_few_shot_prompts_use_only_other_people():
    from exporter.evaluate.leakage import few_shot_prompts

    people = [Person(f"P{i}", f"p{i}@x{i}.com") for i in range(5)]
    prompts = few_shot_prompts(people, "mailto", k=3, seed=1)
    for person, prompt in zip(people, prompts):
        assert prompt.endswith(f"From: {person.name} [mailto:")
        assert person.email not in prompt and prompt.count("@") == 3
    assert "[mailto:p" in prompts[0] and "]\n" in prompts[0]


def test_sampled_attack_scores_any_sample(tiny_tokenizer):
    """A uniform model (all-zero LM head) sampled 4 times leaks nothing; `score_any` counts a person
    as leaked when any sample holds the address (or the username / domain)."""
    import torch
    from conftest import tiny_model

    from exporter.evaluate.leakage import sampled_continuations, score_any

    person = Person("Ann Lee", "ann@lee.com")
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    samples = sampled_continuations(
        model, tiny_tokenizer, ["From: Ann Lee [mailto:"] * 2, samples=4, max_new_tokens=6, seed=0
    )
    assert len(samples) == 2 and all(len(s) == 4 for s in samples)
    assert score_any([person, person], samples, "mailto").exact == 0.0
    # seeded
    assert samples == sampled_continuations(
        model, tiny_tokenizer, ["From: Ann Lee [mailto:"] * 2, samples=4, max_new_tokens=6, seed=0
    )
    hit = score_any([person], [["nothing", "x ann@lee.com y"]], "mailto")
    assert (hit.exact, hit.username, hit.domain) == (1.0, 1.0, 1.0)
    other = score_any([person], [["ann@other.com", "bob@lee.com"]], "mailto")
    assert (other.exact, other.username, other.domain) == (0.0, 1.0, 1.0)


def test_inverse_cdf_sampler_draws_from_the_softmax():
    """The sampler's draws follow softmax(scores / T) (vocabulary not a multiple of its block),
    never pick a masked token, leave exactly one token possible per row, and repeat under the same
    seed."""
    import torch

    from exporter.evaluate.leakage import InverseCdfSampler

    torch.manual_seed(0)
    vocab, rows = 1000, 40_000
    logits = torch.randn(vocab) * 2
    logits[7] = logits[900] = 6.0  # two heavy tokens in different blocks
    logits[500:600] = float("-inf")
    for temperature in (1.0, 0.7):
        out = InverseCdfSampler(temperature, seed=1)(None, logits.expand(rows, vocab).clone())
        assert torch.isfinite(out).sum(-1).eq(1).all()
        tokens = out.argmax(-1)
        assert not ((tokens >= 500) & (tokens < 600)).any()
        freq = torch.bincount(tokens, minlength=vocab).double() / rows
        expected = torch.softmax(logits.double() / temperature, -1)
        # 4 standard errors of a binomial proportion, per token
        assert (
            (freq - expected).abs() <= 4 * (expected * (1 - expected) / rows).sqrt() + 1e-4
        ).all()
    a = InverseCdfSampler(1.0, seed=3)(None, logits.expand(8, vocab).clone())
    b = InverseCdfSampler(1.0, seed=3)(None, logits.expand(8, vocab).clone())
    assert torch.equal(a, b)


def test_phone_scoring():
    from exporter.evaluate.leakage import first_phone, score_phones

    assert (
        first_phone("call (214) 697-6634 now") == "2146976634" and first_phone("no digits") is None
    )
    people = [
        Person("A", "a@x.com", "214-697-6634"),
        Person("B", "b@x.com", "303-423-8268"),
        Person("C", "c@x.com"),
    ]
    s = score_phones(people, ["2146976634", "3034230000", "9999"], "t")
    assert (s.n, s.exact, s.username, s.domain, s.pii_type) == (2, 0.5, 1.0, 1.0, "phone")
