"""Training against the attack: does a distilled export hold if it learns to resist relearning?

Tamper-resistant training ("Tamper-resistant safeguards for open-weight LLMs", Tamirisa et al.
2024) simulates the fine-tuning attack while it trains, so that the weights stay safe after it.
This is its first-order form on the distilled student S0 (the chosen patch learnt into the base
as the export does), in rounds:

1. the attack: fresh LoRA adapters (the relearning budget's rank and learning rate) trained for
   `--attack` steps on the defender's own synthetic people's PII documents (another seed than
   the evaluation's relearning people);
2. the defence: `--defend` steps on the MLP weights of layers `--from-layer`.. of S (full rank,
   AdamW `--lr`), the attack's adapters frozen and on: S + attack keeps S0's next-token
   distribution on the recipe's PII documents (with `--focus`, only where the next token is an
   address's), and S without them keeps S0's on the benign windows (the distillation's weight);
3. the adapters dropped.

The student and the trained copy are each attacked on the validation and test people with the
final evaluation's template attacks (greedy, k-shot, sampled), as they are and after the
relearning attack (the harness's budget, on other people's PII documents); KL and perplexity on 48
held-out pydoc texts.

    python benchmarks/relearn_adversarial.py --recipe R --work W [--candidate 150:0.2]
        [--rounds 8] [--attack 40] [--defend 8] [--lr 2e-5] [--from-layer 10] [--focus]

W is a work folder of a run of R (its cached probe, SAE and features are read). Choose on the
validation columns; the test columns report. Counts only: no name, address or generated text is
printed or written.
"""

from __future__ import annotations

import copy
import time

import torch
from relearn_noise import bench_args, report, setup_of, student_of
from torch.nn.utils.rnn import pad_sequence

from exporter.data.detectors import detect
from exporter.data.labels import token_labels
from exporter.distill import adapted_modules, fixed_batches, with_adapters
from exporter.harden import kl_from
from exporter.methods.batches import cycle, encode
from exporter.models import architecture_of, unfrozen
from exporter.relearn import next_token_steps, relearning_texts
from exporter.run.distilled import config_of


def address_batches(tok, texts: list[str], size: int, max_length: int = 96) -> list[tuple]:
    """(ids, mask, where) batches of the texts that hold an address; `where` marks the positions
    whose next token is one of an address's (where its tokens are predicted)."""
    rows = []
    for text in texts:
        labels = token_labels(tok, text, detect(text, ["email"]), max_length)
        where = torch.roll(labels.pii, -1)
        where[-1] = False
        if where.any():
            rows.append((labels.input_ids, where))
    rows.sort(key=lambda r: len(r[0]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def padded(tensors, value):
        return pad_sequence(tensors, batch_first=True, padding_value=value)

    out = []
    for start in range(0, len(rows), size):
        ids, where = zip(*rows[start : start + size])
        mask = [torch.ones_like(i) for i in ids]
        out.append((padded(ids, pad), padded(mask, 0), padded(where, False)))
    return out


def bfloat16():
    """One forward's autocast. Never one block around several steps: autocast keeps its casts of
    trainable weights for the length of its block, so steps inside it would train nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16)


def hardened(s0, setup, args):
    """A copy of `s0` trained in rounds against a simulated relearning attack (see the module's
    docstring), and the per-round losses."""
    tok, budget = setup.tok, setup.budget
    student = copy.deepcopy(s0)
    for p in s0.parameters():
        p.requires_grad_(False)
    last = architecture_of(student).num_layers(student) - 1
    every = adapted_modules(student, last)
    mlps = {
        f"{name}.weight"
        for name in adapted_modules(student, last, first=args.from_layer)
        if ".mlp." in name
    }
    weights = {n: p for n, p in student.named_parameters() if n in mlps}
    opt = torch.optim.AdamW(list(weights.values()), lr=args.lr, weight_decay=0.0)
    own = relearning_texts(
        "other_people", setup.prep.inputs.benign_path, 800, setup.recipe.data.seed + 1000
    )  # the defender's own people: not the ones the evaluation relearns on
    pii = (
        address_batches(tok, setup.texts["pii"], args.batch)
        if args.focus
        else fixed_batches(tok, setup.texts["pii"], args.batch, 96)
    )
    benign = fixed_batches(tok, setup.texts["benign"], args.batch, 96)
    benign_weight = config_of(setup.recipe).benign_weight
    gen = torch.Generator().manual_seed(7)

    def pick(batches):
        return batches[int(torch.randint(len(batches), (1,), generator=gen))]

    curve = []
    for r in range(args.rounds):
        for p in student.parameters():
            p.requires_grad_(False)
        net = with_adapters(student, every, budget.rank, budget.seed + 100 + r)
        adapters = [p for p in net.parameters() if p.requires_grad]
        attack_opt = torch.optim.AdamW(adapters, lr=budget.lr, weight_decay=0.0)
        batches = cycle(*encode(tok, own, budget.max_length, "cpu"), budget.batch_size, 100 + r, 16)
        net.train()
        attack_loss = next_token_steps(net, batches, args.attack, attack_opt, bfloat16)
        for w in weights.values():
            w.requires_grad_(True)
        for _ in range(args.defend):
            for p in adapters:  # peft turns them back on when its disable_adapter() block ends
                p.requires_grad_(False)
            opt.zero_grad(set_to_none=True)
            forget = kl_from(s0, net, *pick(pii), cast=bfloat16)
            forget.backward()
            with net.disable_adapter():
                keep_ = kl_from(s0, net, *pick(benign), cast=bfloat16)
            (benign_weight * keep_).backward()
            opt.step()
        student = net.unload()
        curve.append((attack_loss, forget.item(), keep_.item()))
        print(f"round {r}: attack loss {curve[-1][0]:.3f}, after it KL to S0 on PII text "
              f"{curve[-1][1]:.3f}, benign {curve[-1][2]:.4f}", flush=True)  # fmt: skip
    return unfrozen(student).eval(), curve


def main() -> None:
    ap = bench_args(__doc__)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--attack", type=int, default=40)
    ap.add_argument("--defend", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--from-layer", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--focus", action="store_true", help="the PII loss at addresses only")
    args = ap.parse_args()

    torch.manual_seed(0)
    setup = setup_of(args)
    student, seconds = student_of(setup, args)
    started = time.perf_counter()
    trained, _ = hardened(student, setup, args)
    label = (
        f"+ {args.rounds} rounds against the attack ({args.attack} attack, {args.defend} "
        f"defence steps{', addresses only' if args.focus else ''})"
    )
    report(
        {
            f"distilled ({seconds:.0f} s)": student,
            f"{label} ({time.perf_counter() - started:.0f} s)": trained,
        },
        setup,
        args.json,
    )


if __name__ == "__main__":
    main()
