"""The model card of a weight-editing method's export (RMU, GA/NPO, DEPN): a plain checkpoint scored
by the same harness as PrivacyScalpel's."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard

from .card import TAGS, card_data, evaluation_parts, finish, rates, usage
from .evaluate.summary import markdown_table
from .threat import threat_section

METHOD_NAMES = {"rmu": "RMU", "gradient_ascent": "gradient ascent", "depn": "DEPN"}
METHOD_TEXT = {
    "rmu": "RMU (Li et al. 2024) trained the MLP output projections of decoder layers {l2} to "
    "{layer}: on the PII documents the layer-{layer} residual stream was pushed towards a fixed "
    "random vector of norm {c:g}, on benign prose it was held to the base's (retain weight "
    "{alpha:g}).",
    "gradient_ascent": "{loss} on the PII documents{kl}{lora}.",
    "depn": "DEPN (Wu et al. 2023) attributed the likelihood of the PII tokens of {examples} "
    "documents to MLP neurons by integrated gradients and zeroed the output weights of the {n} "
    "neurons found most often.",
}


def method_text(report: dict) -> str:
    """What the method did, in one paragraph, with its settings."""
    s, chosen = report["settings"], report["search"]["chosen"]
    if report["method"] == "rmu":
        return METHOD_TEXT["rmu"].format(
            l2=max(0, report["layer"] - 2), layer=report["layer"], c=s["c"], alpha=s["alpha"]
        )
    if report["method"] == "gradient_ascent":
        loss = (
            "Gradient ascent (Jang et al. 2022)"
            if s["loss"] == "ga"
            else f"NPO (Zhang et al. 2024, beta {s['beta']:g})"
        )
        kl = (
            f", with a KL-to-base term on benign prose (weight {s['retain_kl']:g})"
            if s["retain_kl"]
            else ""
        )
        lora = (
            f", through a rank-{s['lora_rank']} LoRA adapter merged into the weights"
            if s["lora_rank"]
            else ", full fine-tune"
        )
        return (
            METHOD_TEXT["gradient_ascent"].format(loss=loss, kl=kl, lora=lora)
            + f" {chosen['value']} steps."
        )
    return METHOD_TEXT["depn"].format(
        examples=s["examples"], n=chosen.get("neurons", chosen["value"])
    )


def _path_parts(search: dict) -> list[str]:
    """How the stopping point was chosen: every point of the path with its scores."""
    head = [
        "point",
        "worst exact",
        "worst username",
        "KL",
        "perplexity",
        "repeated 4-grams",
        "seconds",
    ]
    rows = [
        [
            p["label"],
            *rates(p),
            f"{p['kl']:.4f}",
            f"{p['perplexity']:.2f}",
            "-" if p.get("repetition") is None else f"{p['repetition']:.3f}",
            f"{p['seconds']:.0f}",
        ]
        for p in search["points"]
    ]
    verdict = "met" if search["met"] else "not met; the least leaky point was kept"
    return [
        "## How the stopping point was chosen",
        "",
        "Each point of the method's path was scored on **validation** people and values "
        "(zero-shot and k-shot templates on the people, each value's own document text before it; "
        "greedy) and next-token KL on benign text; the run stopped at the first point meeting the "
        f"targets ({100 * search['target']:g}% exact, {100 * search['username_target']:g}% "
        f"username; {verdict}).",
        "",
        markdown_table(head, rows),
        "",
    ]


def render_method_card(
    report: dict,
    recipe_yaml: str,
    *,
    base: dict,
    model_type: str,
    repo: str = "path/to/this-folder",
    plots: tuple[str, ...] = (),
) -> ModelCard:
    """The card of a weight-editing method's export: a plain checkpoint, scored by the same
    harness."""
    name = METHOD_NAMES[report["method"]]
    data = card_data(base, [*TAGS[:3], "unlearning", "scalpel-exporter", model_type])
    search, ev = report["search"], report["evaluation"]
    parts = [
        f"# {base.get('base_model', 'Model')} with its memorised PII unlearned by {name} "
        "(scalpel-exporter)",
        "",
        method_text(report) + f" {len(search['changed_tensors'])} tensors "
        f"({search['changed_parameters']:,} parameters) differ from the base; every other one is "
        f"unchanged. A plain `{model_type}` checkpoint: no remote code.",
        "",
    ]
    control = (
        "`control` zeroes as many random neurons of the same layers: an effect it also shows is "
        "damage, not privacy."
        if "control" in ev
        else "A training method has no cheap control (it would be a second run on other text)."
    )
    parts += evaluation_parts(
        ev,
        "Extraction attacks on **test** people and values (never used to choose the stopping "
        "point; unlike PrivacyScalpel, the method trained on their documents, which is how it "
        f"forgets) and on never-seen people (the guessing baseline). {control}",
    )
    parts += threat_section(ev, remote=False)
    parts += _path_parts(search)
    parts += [f"![{Path(p).stem}]({p})" for p in plots] + ([""] if plots else [])
    parts += ["## Usage", "", usage(repo, remote=False), ""]
    return finish(parts, recipe_yaml, data, sae=False)
