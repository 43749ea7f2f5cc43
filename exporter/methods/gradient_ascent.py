"""Gradient ascent on the PII sequences (Jang et al. 2022) and NPO (Zhang et al. 2024).

GA maximises the forget text's negative log-likelihood; NPO replaces it with the bounded `-(2/beta)
log sigmoid(-beta * (log pi(x) - log pi_ref(x)))` per sequence, which stops pushing once a sequence
is well below the reference model's likelihood and so degrades the model far more slowly. Either can
add a KL-to-base term on benign text (Yao et al. 2023). Full fine-tune, or a peft LoRA adapter
merged into the weights at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models import unfrozen
from ..precision import device_of
from .base import Method, Point
from .batches import cycle, encode, token_log_probs

LORA_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "c_attn",
    "c_proj",
    "c_fc",
    "query_key_value",
    "dense",
    "dense_h_to_4h",
    "dense_4h_to_h",
)


def _sequence_log_prob(model, ids, mask) -> torch.Tensor:
    lp, keep = token_log_probs(model, ids, mask)
    return (lp * keep).sum(1)


def _with_lora(model, spec, seed: int):
    """(the model with rank-r LoRA adapters on its linear projections, the base weights they
    adapt)."""
    from peft import LoraConfig, get_peft_model

    present = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    targets = [t for t in LORA_TARGETS if t in present]
    names = [
        n + ".weight"
        for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in targets and isinstance(m, torch.nn.Linear)
    ]
    torch.manual_seed(seed)  # the adapters' initialisation
    config = LoraConfig(
        r=spec.lora_rank, lora_alpha=2 * spec.lora_rank, target_modules=targets, lora_dropout=0.0
    )
    return get_peft_model(model, config), names


def _npo_reference(net, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each forget document's log-likelihood before any update (NPO's reference)."""
    with torch.no_grad():
        return torch.cat(
            [
                _sequence_log_prob(net, ids[i : i + 16], mask[i : i + 16])
                for i in range(0, len(ids), 16)
            ]
        )


def _forget_loss(net, ids, mask, idx, spec, ref_lp) -> torch.Tensor:
    """GA: the mean log-likelihood per token (minimised: -NLL); NPO: its preference loss vs the
    reference."""
    m = mask[idx]
    width = int(m.sum(1).max())
    lp = _sequence_log_prob(net, ids[idx, :width], m[:, :width])
    if spec.loss == "ga":
        return (lp / m[:, 1:width].sum(1).clamp(min=1)).mean()
    return -(2 / spec.beta) * F.logsigmoid(-spec.beta * (lp - ref_lp[idx])).mean()


def _retain_kl(net, reference, batch) -> torch.Tensor:
    """KL(base || model) per real token of a benign batch."""
    ids, mask = batch
    with torch.no_grad():
        base = torch.log_softmax(reference(ids, mask), -1)
    cur = torch.log_softmax(
        net(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1
    )
    return (base.exp() * (base - cur)).sum(-1)[mask.bool()].mean()


def gradient_ascent(
    spec, model, tokenizer, forget, retain, *, seed: int, progress: bool = True
) -> Method:
    state = {"model": model}
    if spec.lora_rank:
        state["model"], names = _with_lora(model, spec, seed)
    else:
        names = [n for n, _ in model.named_parameters()]

    def path():
        torch.manual_seed(seed)
        net = state["model"]
        trained = [p for n, p in net.named_parameters() if (not spec.lora_rank) or "lora_" in n]
        for p in net.parameters():
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(
            trained, lr=spec.lr, weight_decay=0.0, fused=trained[0].device.type in ("cpu", "cuda")
        )
        device = device_of(net)
        f_ids, f_mask = encode(tokenizer, forget, spec.max_length, device)
        ref_lp = _npo_reference(net, f_ids, f_mask) if spec.loss == "npo" else None
        reference = _reference(net, bool(spec.lora_rank)) if spec.retain_kl else None
        rows = torch.arange(len(f_ids))
        f_batches = cycle(
            rows[:, None], torch.ones(len(f_ids), 1, dtype=torch.long), spec.batch_size, seed
        )
        r_batches = None
        if spec.retain_kl:
            r_batches = cycle(
                *encode(tokenizer, retain, spec.max_length, device), spec.batch_size, seed + 1
            )
        bar = tqdm(total=max(spec.steps), desc=spec.loss.upper(), disable=not progress)
        step = 0
        net.train(False)
        try:
            for stop in sorted(spec.steps):
                while step < stop:
                    forget_loss = _forget_loss(
                        net, f_ids, f_mask, next(f_batches)[0][:, 0], spec, ref_lp
                    )
                    kl = (
                        _retain_kl(net, reference, next(r_batches))
                        if r_batches
                        else torch.zeros(())
                    )
                    loss = forget_loss + spec.retain_kl * kl if r_batches else forget_loss
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    bar.update(1)
                    bar.set_postfix(forget=f"{forget_loss.item():.3f}", kl=f"{kl.item():.3f}")
                stats = {"forget_loss": forget_loss.item(), "retain_kl": kl.item()}
                yield Point(step, f"{spec.loss.upper()} {step} steps", stats)
        finally:
            bar.close()
            unfrozen(net)

    def finish():
        if spec.lora_rank and state["model"] is not model:
            state["model"] = state["model"].merge_and_unload()
        return state["model"]

    return Method("gradient_ascent", names, path, finish=finish)


def _reference(net, lora: bool):
    """The base model's logits: the adapters switched off (LoRA), or a frozen copy (full
    fine-tune)."""
    if lora:

        def forward(ids, mask):
            with net.disable_adapter():
                return net(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()

        return forward
    import copy

    frozen = copy.deepcopy(net).eval()
    return lambda ids, mask: frozen(
        input_ids=ids, attention_mask=mask, use_cache=False
    ).logits.float()
