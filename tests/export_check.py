"""Run in a fresh process that cannot import `exporter`: load exports with stock transformers, report JSON.

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
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

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
    model, info = AutoModelForCausalLM.from_pretrained(case["dir"], trust_remote_code=True, output_loading_info=True)
    r["class"] = type(model).__name__
    r["missing"], r["unexpected"] = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    with torch.no_grad():
        logits = model(input_ids=case["ids"], attention_mask=case["mask"]).logits
        r["rel_err"] = float((logits - case["logits"]).abs().max() / case["logits"].abs().max())
        r["equal_base"] = bool(torch.equal(logits, case["base_logits"]))
        kw = dict(input_ids=case["gen_ids"], attention_mask=case["gen_mask"], max_new_tokens=8, do_sample=False,
                  pad_token_id=0)
        cached = model.generate(**kw, use_cache=True)
        uncached = model.generate(**kw, use_cache=False)
    r["generate_cache_equal"] = bool(torch.equal(cached, uncached))
    r["generate_equal_inprocess"] = bool(torch.equal(cached, case["generated"]))
    half = AutoModelForCausalLM.from_pretrained(case["dir"], trust_remote_code=True, dtype=torch.bfloat16)
    with torch.no_grad():
        half_logits = half(input_ids=case["ids"], attention_mask=case["mask"]).logits.float()
    r["bf16_dtype"] = str(next(half.model.parameters() if hasattr(half, "model") else half.parameters()).dtype)
    r["bf16_patch_dtype"] = str(half.scalpel_patch.directions.dtype)
    r["bf16_finite"] = bool(torch.isfinite(half_logits).all())
    r["bf16_rel_err"] = float((half_logits - case["logits"]).abs().max() / case["logits"].abs().max())
    r["bf16_argmax_agree"] = float((half_logits.argmax(-1) == case["logits"].argmax(-1)).float().mean())
    try:
        AutoModelForCausalLM.from_pretrained(case["dir"])
        r["untrusted"] = "loaded"
    except Exception as exc:  # noqa: BLE001 - any refusal counts; the type is reported
        r["untrusted"] = type(exc).__name__
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
