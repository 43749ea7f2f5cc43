"""Run in a fresh process that cannot import `exporter`: load exports with stock transformers,
report JSON.

usage: python export_check.py CASES.pt   (written by tests/test_export.py)
"""

import json
import sys


class _BlockExporter:
    def find_spec(self, name, path=None, target=None):
        if name == "exporter" or name.startswith("exporter."):
            raise ImportError(f"{name} is blocked in this process")


sys.meta_path.insert(0, _BlockExporter())

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

spec = torch.load(sys.argv[1])
cases = spec["cases"]
results = {}
try:
    import exporter  # noqa: F401

    results["exporter_importable"] = True
except ImportError:
    results["exporter_importable"] = False

for name, case in cases.items():
    r = {}
    base_class = getattr(transformers, case["base_class"])
    model, info = AutoModelForCausalLM.from_pretrained(
        case["dir"], trust_remote_code=True, output_loading_info=True
    )
    r["class"] = type(model).__name__
    r["missing"], r["unexpected"] = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    with torch.no_grad():
        logits = model(input_ids=case["ids"], attention_mask=case["mask"]).logits
        r["rel_err"] = float((logits - case["logits"]).abs().max() / case["logits"].abs().max())
        r["equal_base"] = bool(torch.equal(logits, case["base_logits"]))
        if case.get("compile", True):  # a graph break would raise
            compiled = torch.compile(model, fullgraph=True, backend="eager")
            r["compiled_rel_err"] = float(
                (compiled(input_ids=case["ids"], attention_mask=case["mask"]).logits
                 - case["logits"]).abs().max()
                / case["logits"].abs().max()
            )  # fmt: skip
        body, body_info = AutoModel.from_pretrained(
            case["dir"], trust_remote_code=True, output_loading_info=True
        )
        r["body_class"] = type(body).__name__
        r["body_unexpected"] = sorted(body_info["unexpected_keys"]) + sorted(
            body_info["missing_keys"]
        )
        hidden = body(input_ids=case["ids"], attention_mask=case["mask"]).last_hidden_state
        full = model(
            input_ids=case["ids"], attention_mask=case["mask"], output_hidden_states=True
        ).hidden_states[-1]
        r["body_rel_err"] = float((hidden - full).abs().max() / full.abs().max())
    half = AutoModelForCausalLM.from_pretrained(
        case["dir"], trust_remote_code=True, dtype=torch.bfloat16
    )
    with torch.no_grad():
        half_logits = half(input_ids=case["ids"], attention_mask=case["mask"]).logits.float()
    r["bf16_dtype"] = str(
        next(half.model.parameters() if hasattr(half, "model") else half.parameters()).dtype
    )
    r["bf16_patch_dtype"] = str(half.scalpel_patch.directions.dtype)
    r["bf16_finite"] = bool(torch.isfinite(half_logits).all())
    real = case[
        "mask"
    ].bool()  # what pad positions predict is read by no one (and differs between dtypes)
    r["bf16_rel_err"] = float(
        (half_logits - case["logits"])[real].abs().max() / case["logits"][real].abs().max()
    )
    r["bf16_argmax_agree"] = float(
        (half_logits.argmax(-1) == case["logits"].argmax(-1))[real].float().mean()
    )
    for how, load in (
        ("untrusted", lambda: AutoModelForCausalLM.from_pretrained(case["dir"])),
        ("stock_class", lambda: base_class.from_pretrained(case["dir"])),
    ):
        try:
            load()
            r[how] = "loaded"
        except Exception as exc:  # noqa: BLE001 - any refusal counts; the type and message are checked by the test
            r[how] = f"{type(exc).__name__}: {exc}"
    # Told to ignore the size mismatch, the base's own class finds none of the decoder stack's
    # tensors (a random model under the base's head).
    stock = base_class.from_pretrained(case["dir"], ignore_mismatched_sizes=True).state_dict()
    r["stock_found"] = sorted(
        k for k, v in case["base_matrices"].items() if k in stock and torch.equal(stock[k], v)
    )
    if case.get("tokenizer"):
        r["tokenizer"] = type(AutoTokenizer.from_pretrained(case["dir"])).__name__
    results[name] = r

for path in spec.get("tampered", []):
    try:
        AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
        results[f"tampered:{path}"] = "loaded"
    except Exception as exc:  # noqa: BLE001 - the refusal's type and message are checked by the test
        results[f"tampered:{path}"] = f"{type(exc).__name__}: {exc}"
print("RESULTS " + json.dumps(results))
