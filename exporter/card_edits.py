"""The card's "How it works" for an export whose weights were changed: a patch distilled into
them, or its directions projected out of them."""

from __future__ import annotations

from .distill import first_adapted


def plain_section(report: dict, sae: dict) -> str:
    steer = (
        f" plus `s`, the steering vector (alpha = {report['alpha']:g} of the layer's mean norm), "
        f"carried as the bias of layer {report['layer']}'s MLP output projection"
        if report["alpha"]
        else ""
    )
    return (
        f"At layer {report['layer']} a TopK sparse autoencoder (k = "
        f"{sae.get('k', report.get('k', '?'))}, held-out FVU {sae.get('fvu', float('nan')):.3f}) "
        f"found the |A| = {report['ablate_n']} latents most active on personal data (rule "
        f"`{report['rule']}`, score `{report['score']}`). Their decoder directions span a subspace "
        f"that is projected out of {_projected_writers(report)}{steer}. Unlike the remote-code "
        "patch, which removes each latent's contribution only where it fires, this acts on every "
        "token: its own evaluation above is what counts."
    )


def first_changed(report: dict) -> int:
    """The first decoder layer the distillation's adapters were on (reports written before
    `adapted_layers` existed adapted every layer from 0)."""
    count = report["distill"]["settings"].get("adapted_layers", 0)
    return first_adapted(report["layer"], count)


def distilled_layers(report: dict) -> str:
    """Which decoder layers a distillation changed: its adapted layers up to l, or those and
    every later one when its later-layer phase (defence in depth) ran too."""
    first = first_changed(report)
    if report["distill"]["settings"].get("late_steps"):
        return "every decoder layer" if first == 0 else f"every decoder layer from {first} on"
    upto = f"decoder layers {first} to {report['layer']}"
    return upto + (", and the MLPs of every later layer" if report["distill"].get("harden") else "")


def _harden_sentence(report: dict) -> str:
    """What hardening against relearning did, when it ran."""
    h, layer = report["distill"].get("harden"), report["layer"]
    if not h:
        return ""
    if h.get("reference") and h.get("directions"):
        edit = (
            f"each MLP map of every layer after {layer} had its change from the model this one "
            f"was fine-tuned from undone along the {h['directions']} input directions the personal "
            "data's tokens use most relative to benign text (where a fine-tune writes what it "
            "memorises),"
        )
    elif h.get("reference"):
        edit = (
            f"the MLPs of every layer after {layer} were set to the weights of the model this one "
            "was fine-tuned from, which never saw the personal data,"
        )
    else:
        edit = (
            f"the {h['neurons']} neurons of the later layers whose attribution to the personal "
            "data's tokens most exceeds their attribution to benign text were zeroed (DEPN's edit),"
        )
    return (
        " Then, against a fine-tune that brings the hidden values back (relearning), "
        f"{edit} and the MLP weights of every layer after {layer} "
        f"({h['repaired_tensors']} tensors, full rank) were trained for {h['steps']} steps "
        "towards the distilled model's next-token "
        f"distribution (final KL to it {h['final_kl']['pii']:.3f} nats/token on PII text, "
        f"{h['final_kl']['benign']:.3f} on benign prose): the repair restores what the distilled "
        "model shows, which holds none of the hidden values."
    )


def _late_sentence(report: dict) -> str:
    d, layer = report["distill"], report["layer"]
    late = d.get("late")
    if not late:
        return ""
    kl = late["heldout_kl"]
    measured = (
        f" (on held-out test documents that KL fell from {kl['before']['pii']:.3f} to "
        f"{kl['after']['pii']:.3f} nats/token)"
        if "pii" in kl.get("after", {})
        else ""
    )
    return (
        f" First, LoRA adapters on the layers after {layer} were trained for "
        f"{d['settings']['late_steps']} steps so that, fed the base's own layer-{layer} output on "
        "PII text, they give the patched model's next-token distribution (and the base's on "
        f"benign prose){measured}: features a fine-tune restores no longer lead to the hidden "
        "values as directly."
    )


def distilled_section(report: dict, sae: dict) -> str:
    d, cfg = report["distill"], report["distill"]["settings"]
    held = d["heldout"].get("pii")
    measured = (
        f" On held-out test documents the layer-{report['layer']} output's squared distance to "
        f"the patched model's (relative to its squared norm) fell from {held['base']:.4f} for the "
        f"base to {held['student']:.4f}."
        if held
        else ""
    )
    return (
        f"The teacher is the remote-code patch chosen on validation people (|A| = "
        f"{report['ablate_n']} latents of a TopK SAE with k = {sae.get('k', report.get('k', '?'))} "
        f"at layer {report['layer']}, steering alpha = {report['alpha']:g}, mode "
        f"`{report['mode']}`). LoRA adapters (rank {cfg['rank']}) on every linear map of layers "
        f"{first_changed(report)} to {report['layer']} were trained for {cfg['steps']} steps so "
        f"that the layer-{report['layer']} output matches the patched one on {cfg['documents']} "
        "PII documents"
        + (" and the attack templates written out for their people" if cfg["templates"] else "")
        + ", and the base's on as much benign prose, then merged into the weights."
        + measured
        + _late_sentence(report)
        + _harden_sentence(report)
        + " The `control` column is the same distillation with the control patch as teacher."
    )


def _projected_writers(report: dict) -> str:
    first, layer = report.get("plain_from", 0), report["layer"]
    if first == 0:
        return (
            "the token embeddings and of every attention and MLP output projection (weights and "
            f"biases) of layers 0 to {layer}, so what layer {layer} hands on is `(I - P_A) h`"
        )
    return (
        f"every attention and MLP output projection (weights and biases) of layers {first} to "
        f"{layer}; what the embeddings and layers before {first} write along it is kept, so layer "
        f"{layer} hands on `h - P_A (h - h_{first - 1})`, with `h_{first - 1}` the stream entering "
        f"layer {first}"
    )
