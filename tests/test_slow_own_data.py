"""A user's own model and corpus on the real SmolLM2, with no people file (slow): a mail archive
read, detected, audited and patched by a recipe that names only the model and the folder; and the
demo's leaky model with its corpus and no people file, where the corpus-derived attacks show the
leak and its removal on test values."""

import json
import subprocess
import sys

import pytest
from helpers.mail import write_maildir

pytestmark = pytest.mark.slow


def scalpel(*args, timeout: int = 3600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "exporter", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _addresses(maildir) -> list[str]:
    from exporter.data.corpus import read_corpus
    from exporter.evaluate.prefix import corpus_values

    return [v for v, kind in corpus_values(read_corpus(maildir, ["email"])).items()]


def test_a_maildir_is_detected_audited_and_patched_on_smollm2(tmp_path):
    # 40 messages, 80 named addresses: the final evaluation attacks every test person and value
    # with every template, three times (base, patch, control), within CI's time
    maildir = write_maildir(tmp_path / "maildir", users=("allen-p",), per_folder=20)
    found = scalpel("detect", maildir)
    assert "40 documents" in found.stdout
    audit = scalpel("audit", "smollm2-135m", "--data", maildir, "--out", tmp_path / "audit")
    print(audit.stdout)
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    # SmolLM2 never saw these messages: it completes (almost) none of their addresses
    exact = [r["exact"] for r in report["rows"] if r["pii_type"] == "email"]
    assert exact and max(exact) <= 0.05
    # The recipe a user writes: the model and the folder (the SAE and the attacks trimmed to fit
    # CI's time: the base never saw these addresses, so there is no leak for a better SAE to find).
    (tmp_path / "recipe.yaml").write_text(
        "model: {builtin: smollm2-135m}\ndata: {pii: {path: maildir}}\n"
        "sae: {train_tokens: 1000000}\n"
        "eval: {adversarial: false, user_path: false, samples: 0, memorisation_docs: 10}\n"
    )
    run = scalpel("run", tmp_path / "recipe.yaml", "--out", tmp_path / "out",
                  "--work", tmp_path / "work")  # fmt: skip
    assert "no people file" in run.stdout + run.stderr
    result = json.loads((tmp_path / "out" / "scalpel_report.json").read_text())
    rows = result["evaluation"]["patched"]["leakage"]
    assert {r["attack"] for r in rows} >= {"prefix32", "prefix8", "mailto"}
    assert {r["group"] for r in rows} == {"test"}
    assert result["evaluation"]["patched"]["utility"]["kl"] <= 0.01
    written = audit.stdout + run.stdout + run.stderr + (tmp_path / "out" / "README.md").read_text()
    written += json.dumps(result) + json.dumps(report)
    assert not [a for a in _addresses(maildir) if a in written.lower()]


def test_the_leaky_model_with_no_people_file_is_patched_on_test_values(tmp_path):
    """The demo's leaky SmolLM2 and its corpus, the recipe naming only them: the patch is chosen on
    validation values and removes the leak of test values the leaky base completes from their
    documents' text; the control leaves it."""
    from exporter.recipe import ModelSpec
    from exporter.run.context import RunContext
    from exporter.run.leaky import make_leaky

    leaky = make_leaky(ModelSpec(builtin="smollm2-135m"), ctx=RunContext(progress=False)).path
    (tmp_path / "recipe.yaml").write_text(
        f"model: {{path: {leaky}}}\ndata: {{pii: {{path: {leaky / 'corpus.jsonl'}}}}}\n"
        "eval: {adversarial: false, user_path: false, memorisation_docs: 10}\n"
    )
    scalpel("run", tmp_path / "recipe.yaml", "--out", tmp_path / "out", "--work", tmp_path / "w")
    ev = json.loads((tmp_path / "out" / "scalpel_report.json").read_text())["evaluation"]

    def worst(variant: str, attack: str) -> float:
        return max(
            r["exact"]
            for r in ev[variant]["leakage"]
            if r["attack"] == attack and r["pii_type"] == "email"
        )

    assert worst("base", "prefix32") >= 0.3
    assert worst("patched", "prefix32") <= 0.02 and worst("patched", "prefix8") <= 0.02
    assert worst("control", "prefix32") >= worst("base", "prefix32") / 2
