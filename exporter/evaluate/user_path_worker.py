"""Generate as a user does: a fresh process with stock transformers, the model loaded as
`from_pretrained` gives it by default (on the CPU; for a recipe that runs on a GPU, moved there as
a user with one would: `.to("cuda")`, or `device_map="auto"`), each prompt alone (a batch of one),
greedy.

Run by `exporter.evaluate.user_path` as a script (never imported there, and it cannot import
`exporter`): the request comes as JSON on stdin ({"models": {name: folder}, "prompts": [...],
"max_new_tokens": n, "device": "cpu" | "cuda" | "auto"}) and the continuations go back as one
JSON line on stdout, so the prompts (they hold people's names) and what the model says are never
written to disk. Imports only torch, transformers and the standard library.
"""

import json
import sys
import time


class _BlockExporter:
    def find_spec(self, name, path=None, target=None):
        if name == "exporter" or name.startswith("exporter."):
            raise ImportError(
                f"{name} is not importable here: this process runs stock transformers only"
            )


def main() -> None:
    sys.meta_path.insert(0, _BlockExporter())
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    request = json.loads(sys.stdin.read())
    out = {"transformers": transformers.__version__, "continuations": {}, "dtype": {}, "timing": {}}
    device = request.get("device", "cpu")
    placed = {"device_map": "auto"} if device == "auto" else {}
    for name, folder in request["models"].items():
        with open(f"{folder}/config.json") as f:
            remote = "auto_map" in json.load(f)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, **placed)
        model = (model.to("cuda") if device == "cuda" else model).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        texts, tokens, started = [], 0, time.perf_counter()
        with torch.no_grad():
            for prompt in request["prompts"]:
                enc = tok(prompt, return_tensors="pt").to(model.device)
                gen = model.generate(
                    **enc,
                    max_new_tokens=request["max_new_tokens"],
                    do_sample=False,
                    pad_token_id=pad,
                )
                new = gen[0, enc["input_ids"].shape[1] :]
                tokens += len(new)
                texts.append(tok.decode(new, skip_special_tokens=True))
        # generation alone, not loading: what serving the prompts costs
        out["timing"][name] = {"seconds": time.perf_counter() - started, "tokens": tokens}
        out["continuations"][name] = texts
        out["dtype"][name] = str(next(model.parameters()).dtype).removeprefix("torch.")
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
