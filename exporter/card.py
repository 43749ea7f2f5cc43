"""The model card (`README.md`) of an export: Hub metadata, the before/after table, plots, usage,
how it works."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from huggingface_hub import ModelCard, ModelCardData

from .card_edits import distilled_layers, distilled_section, plain_section
from .data.detectors import redact_text
from .evaluate.summary import attack_rows, comparison_rows, markdown_table
from .evaluate.user_path import DECODING as USER_PATH
from .recipe import ModelSpec
from .threat import threat_section

# The built-in aliases are published models; their cards give the id and the license carried over.
BUILTIN_BASES = {
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "gemma3-270m": ("google/gemma-3-270m", "gemma"),
}
TAGS = ["privacy", "pii", "pii-removal", "sparse-autoencoder", "scalpel-exporter"]


def base_metadata(spec: ModelSpec) -> dict:
    """`base_model` and `license` of the model a recipe patches, from what is known offline."""
    if spec.builtin:
        base, license_ = BUILTIN_BASES[spec.builtin]
        return {"base_model": base, "license": license_}
    if spec.hub:
        return {
            "base_model": spec.hub,
            **_card_fields(_hub_cached_readme(spec.hub, spec.revision), ("license",)),
        }
    if spec.path:
        return _card_fields(Path(spec.path) / "README.md", ("base_model", "license"))
    return {}


def _hub_cached_readme(repo_id: str, revision: Optional[str]) -> Optional[Path]:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "README.md", revision=revision)
    return Path(found) if isinstance(found, str) else None


def _card_fields(readme: Optional[Path], keys: tuple[str, ...]) -> dict:
    if readme is None or not readme.is_file():
        return {}
    try:
        data = ModelCard.load(readme).data.to_dict()
    except Exception:  # a malformed base card must not stop an export: the fields are unknown
        return {}
    return {k: data[k] for k in keys if data.get(k)}


def usage(repo: str, remote: bool = True) -> str:
    """How to load the export, pinned to a revision."""
    pin = "remote code runs from this revision" if remote else "the weights you evaluated"
    trust = ", trust_remote_code=True" if remote else ""
    return f"""```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

repo = "{repo}"
revision = "main"  # pin the commit you reviewed: {pin}
model = AutoModelForCausalLM.from_pretrained(repo, revision=revision{trust}, dtype=torch.bfloat16)
tokenizer = AutoTokenizer.from_pretrained(repo, revision=revision)
inputs = tokenizer("The capital of France is", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))
```"""


def rates(s: dict) -> list[str]:
    """A scored point's worst exact and username rates, as the card shows them."""
    if s.get("leakage") is None:  # a lazy search stopped before it: more KL than the choice
        return ["not attacked", "not attacked"]
    # attacks stopped at the first that broke a target
    bound = "" if s.get("complete", True) else "≥"
    return [f"{bound}{100 * s['leakage']:.0f}%", f"{bound}{100 * s['username']:.0f}%"]


def search_section(search: dict) -> str:
    """How the patch was chosen: the targets, the verdict and every candidate's scores."""
    c = search["chosen"]
    head = [
        "ablated latents",
        "alpha",
        "mode",
        "context gate",
        "worst exact",
        "worst username",
        "KL",
        "perplexity",
        "repeated 4-grams",
    ]

    def row(s: dict) -> list[str]:
        return [
            str(s["n"]),
            f"{s['alpha']:g}",
            s["mode"],
            "yes" if s.get("gated") else "no",
            *rates(s),
            f"{s['kl']:.4f}",
            f"{s['perplexity']:.2f}",
            "-" if s.get("repetition") is None else f"{s['repetition']:.3f}",
        ]

    rows = [row(s) for s in search["candidates"] if s["mode"] != "plain"]
    plain = [row(s) for s in search["candidates"] if s["mode"] == "plain"]
    verdict = "met" if search["met"] else "not met by any candidate; the least leaky one was chosen"
    targets = f"{100 * search['target']:g}% exact"
    if search.get("username_target", 1.0) < 1.0:
        targets += f" and {100 * search['username_target']:g}% username"
    if search.get("max_repetition") is not None:
        targets += (
            f"; no collapse: at most {search['max_repetition']:.3f} repeated 4-grams in "
            "continuations of benign validation prompts, the base's share plus the tolerance"
        )
    return (
        "Candidates were scored on **validation** people and values only (zero-shot and k-shot "
        "templates on the people, each value's own document text before it; greedy) and next-token "
        "KL on benign text, attacked in order of increasing KL; the chosen "
        f"one (|A| = {c['n']}, alpha = {c['alpha']:g}, "
        f"{c['mode']}{', context gate' if c.get('gated') else ''}) is the least-KL candidate "
        f"meeting the leakage targets ({targets}; {verdict}). A rate marked ≥ is a lower bound: "
        "that candidate's attacks stopped at the first one that broke a target."
        + (
            f" The search was cross-fitted: the validation people and values were cut into "
            f"{search['folds']} parts, each attacked with the candidate fitted (latents, steering, "
            "context gate) on the other parts' documents only, the rates pooled; the exported "
            "patch is fitted on all of them."
            if search.get("folds", 1) > 1
            else ""
        )
        + "\n\n"
        + "\n\n".join(
            ([markdown_table(head, rows)] if rows else [])
            + (
                [
                    "Plain candidates (projected out of the weights, every token: a different "
                    "intervention, chosen only for a plain export):",
                    markdown_table(head, plain),
                ]
                if plain
                else []
            )
        )
    )


def card_data(base: dict, tags: list[str]) -> ModelCardData:
    """The card's Hub metadata: the base model and its license carried over, our tags."""
    return ModelCardData(
        base_model=base.get("base_model"),
        license=base.get("license", "other"),
        library_name="transformers",
        tags=tags,
        pipeline_tag="text-generation",
    )


def _updates(d: dict) -> str:
    """How a distilled export's changed tensors changed."""
    lora = f"a rank-{d['settings']['rank']} update: {d.get('adapter_parameters', 0):,} trained"
    if d.get("harden"):
        return f"; up to the patch's layer each {lora}, the later MLPs repaired full rank"
    return f", each {lora}"


def _intro(report: dict) -> str:
    if report.get("export") == "distilled":
        d = report["distill"]
        return (
            "This checkpoint is its base model, same architecture and no remote code, with a "
            f"patch that removes memorised personal data (emails, phone numbers) learnt into the "
            f"weights of {distilled_layers(report)}: {d['changed_tensors']} tensors "
            f"({d['changed_parameters']:,} parameters{_updates(d)}) differ from the base. Its "
            "files no longer hold what the patch hides from its outputs."
        )
    if report["mode"] == "plain":
        span = (
            "up to"
            if not report.get("plain_from")
            else f"from decoder layer {report['plain_from']} to"
        )
        return (
            "This checkpoint is its base model, same architecture and no remote code, with the "
            "decoder directions of the sparse-autoencoder features carrying personal data the "
            "base model had memorised (emails, phone numbers) projected out of every weight that "
            f"writes into the residual stream {span} decoder layer {report['layer']}. Only those "
            "tensors differ from the base; every other one is stored byte for byte."
        )
    module = (
        "This checkpoint is its base model plus one small module at decoder layer "
        f"{report['layer']} that removes the sparse-autoencoder features carrying personal data "
        "the base model had memorised (emails, phone numbers)."
    )
    if report.get("export_base") == "distilled":
        d = report["distill"]
        return module + (
            " Under it, the same patch was also learnt into the weights of "
            f"{distilled_layers(report)} ({d['changed_tensors']} tensors, "
            f"{d['changed_parameters']:,} parameters differ from the base): without the module, "
            "the weights are the distilled model, not the leaky base."
        )
    return module + " The base weights are unchanged and stored byte for byte."


def evaluation_parts(evaluation: dict, intro: str) -> list[str]:
    """The before/after section: the summary table and every attack's rates."""
    header, rows = comparison_rows(evaluation)
    return [
        "## Before and after",
        "",
        intro,
        "",
        markdown_table(header, rows),
        "",
        "Every attack (exact / username rate):",
        "",
        markdown_table(*attack_rows(evaluation), text_columns=4),
        "",
    ]


def _remote_usage(report: dict, repo: str) -> list[str]:
    tested = report.get("evaluation", {}).get("user_path", {}).get("transformers")
    measured = (
        f" The rows `{USER_PATH}` above were measured on this folder as written, loaded by stock "
        f"transformers {tested}."
        if tested
        else ""
    )
    return [
        "## Usage",
        "",
        "The patch is remote code shipped in this repository (`modeling_scalpel.py`, "
        "`scalpel_patch.py`; they import only torch and transformers and do no I/O). It is a "
        f"module inserted at decoder layer {report['layer']}, a function of that layer's output "
        "alone, so it acts on every token on every generation path (one prompt or a batch, "
        "sampling, beam search, static cache, `pipeline()`). The tokenizer loads with no remote "
        "code. Without `trust_remote_code=True`, or with the base architecture's own class, "
        "loading stops with a size-mismatch error: the base tensors are stored under names no "
        "stock class looks for, so nothing returns the unpatched model. A patch tensor or a code "
        "file changed after export is "
        "refused (their sha256 are in `config.json`)." + measured,
        "",
        usage(repo),
        "",
    ]


def _remote_how(report: dict, sae: dict) -> list[str]:
    mode = (
        "only the rows of A are kept, each with a gate fitted to agree with the SAE's TopK."
        if report["mode"] == "folded"
        else "the whole encoder is kept (true TopK)."
    )
    gate = (
        " A context gate (a linear detector of PII context at the same layer, `w . h + b > 0`) "
        "restricts the change to tokens in or just before personal data; elsewhere the model is "
        "the base model."
        if report.get("context_gate")
        else ""
    )
    parts = [
        "## How it works",
        "",
        f"At layer {report['layer']} a TopK sparse autoencoder (k = "
        f"{sae.get('k', report.get('k', '?'))}, held-out FVU {sae.get('fvu', float('nan')):.3f}) "
        "encodes the residual stream `h`. The patch computes `h' = h - sum_{i in A} z_i(h) d_i "
        f"+ s`: the contributions of the |A| = {report['ablate_n']} PII latents are removed, the "
        "SAE's reconstruction error is kept, and `s` is the steering vector (alpha = "
        f"{report['alpha']:g} of the layer's mean norm). Latents were ranked by rule "
        f"`{report['rule']}` and score `{report['score']}`. Mode `{report['mode']}`: "
        + mode
        + gate,
        "",
    ]
    stats = report.get("context_gate_stats")
    if stats:
        parts += [
            f"The context gate opens on {100 * stats['recall']:.1f}% of PII-context tokens and "
            f"{100 * stats['open_benign']:.2f}% of benign tokens (validation documents)."
            + (
                f" The detector has one hidden layer of {stats['hidden']} ReLU units "
                "(`v . relu(W h + c) + b > 0`)."
                if stats.get("hidden")
                else ""
            ),
            "",
        ]
    if "folded_vs_exact" in report:
        fx = report["folded_vs_exact"]
        parts += [
            f"Folded vs exact on held-out text: gates agree on {100 * fx['gate_agreement']:.2f}% "
            f"of (token, latent) pairs and on every gate of {100 * fx['token_agreement']:.2f}% of "
            "tokens.",
            "",
        ]
    return parts


def render_card(
    report: dict,
    recipe_yaml: str,
    *,
    base: dict,
    model_type: str,
    repo: str = "path/to/this-folder",
    plots: tuple[str, ...] = (),
) -> ModelCard:
    """The card for an export. Every number comes from `report`; the text passes PII redaction."""
    data = card_data(base, [*TAGS, model_type])
    sae = report.get("sae", {})
    title = f"# {base.get('base_model', 'Model')} with its memorised PII removed (scalpel-exporter)"
    parts = [title, "", _intro(report), ""]
    if "evaluation" in report:
        parts += evaluation_parts(
            report["evaluation"],
            "Extraction attacks on **test** people and values (never used to choose the patch): "
            "the templates on test people, the document-prefix attacks on every test value (its "
            "own document's text before it, the last 32 and 8 tokens), and the templates on "
            "never-seen people (the guessing baseline); `control` is the same number of random "
            "latents matched on firing frequency plus a random direction of the steering vector's "
            "norm: an effect the control also shows is damage, not privacy. Rates are the worst "
            "over the attacks of each family."
            + (
                " `patched` is this checkpoint's weights as they are (no patch: what anyone with "
                "the files has), `teacher` the remote-code patch they learnt, `control` the same "
                "distillation of the control patch."
                if report.get("export") == "distilled"
                else " `weights alone` is this checkpoint's distilled weights loaded without the "
                "patch; `patched` and `control` run over their own distillations."
                if report.get("export_base") == "distilled"
                else ""
            ),
        )
    if "search" in report:
        parts += ["## How the patch was chosen", "", search_section(report["search"]), ""]
    parts += [f"![{Path(p).stem}]({p})" for p in plots] + ([""] if plots else [])
    remote = report["mode"] != "plain" and report.get("export") != "distilled"
    parts += threat_section(report.get("evaluation"), remote)
    if not remote:  # the base's own type, whose weights changed
        how = distilled_section if report.get("export") == "distilled" else plain_section
        parts += [
            "## Usage",
            "",
            f"A plain `{model_type}` checkpoint: stock transformers (and tools that read its "
            "architecture, such as vLLM, TGI or llama.cpp converters) load it with no remote "
            "code.",
            "",
            usage(repo, remote=False),
            "",
            "## How it works",
            "",
            how(report, sae),
            "",
        ]
    else:
        parts += _remote_usage(report, repo) + _remote_how(report, sae)
    return finish(parts, recipe_yaml, data)


def finish(parts: list[str], recipe_yaml: str, data: ModelCardData, sae: bool = True) -> ModelCard:
    """The card from its sections: the SAE's place, the recipe, all redacted; Hub metadata on
    top."""
    parts += (["The SAE is in `sae/` (SAELens format).", ""] if sae else []) + [
        "## Recipe",
        "",
        "```yaml",
        recipe_yaml.rstrip(),
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + redact_text("\n".join(parts)))
