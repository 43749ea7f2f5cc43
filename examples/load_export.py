"""Load a patched export with stock transformers (no scalpel-exporter import) and generate.

python examples/load_export.py patched "The email address of Jane Doe is"
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    folder = sys.argv[1] if len(sys.argv) > 1 else "patched"
    prompt = sys.argv[2] if len(sys.argv) > 2 else "The capital of France is"
    # trust_remote_code runs the export's own small patch module (torch + transformers only, no
    # I/O).
    model = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    patch = model.config.scalpel_patch
    print(
        f"{type(model).__name__}: patch at layer {patch['layer']}, {patch['n_ablate']} latents, "
        f"mode {patch['mode']}"
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    print(tokenizer.decode(out[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True))


if __name__ == "__main__":
    main()
