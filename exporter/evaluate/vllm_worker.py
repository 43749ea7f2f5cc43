"""Generate as a vLLM deployment does: the model folder served by vLLM's offline engine (a stock
checkpoint through its own implementation, a remote-code export through its Transformers backend,
which builds the export's `AutoModel`, the decoder stack with the patch inside it), greedy, every
prompt its own request.

Run by `exporter.evaluate.user_path` as a script with the interpreter of an environment that has
vLLM (it pins its own torch and transformers, so it lives in a venv of its own; it cannot import
`exporter`): the request comes as JSON on stdin ({"models": {name: folder}, "prompts": [...],
"max_new_tokens": n}) and the continuations go back as one JSON line on stdout, so the prompts (they
hold people's names) and what the model says are never written to disk. vLLM's engine runs in a
process of its own, hence the `__main__` guard.
"""

import gc
import json
import os
import sys
import time


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB: the default reserves far more
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import transformers
    import vllm
    from vllm import LLM, SamplingParams

    request = json.loads(sys.stdin.read())
    out = {
        "transformers": transformers.__version__,
        "vllm": vllm.__version__,
        "continuations": {},
        "dtype": {},
        "timing": {},
    }
    params = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"])
    for name, folder in request["models"].items():
        with open(f"{folder}/config.json") as f:
            config = json.load(f)
        remote = "auto_map" in config
        # the attacks' prompts are short: a small context keeps the KV cache small
        longest = config.get("max_position_embeddings") or config.get("n_positions") or 1024
        llm = LLM(
            model=folder,
            trust_remote_code=remote,
            # an export's architecture is no class vLLM knows: its Transformers backend loads it
            model_impl="transformers" if remote else "auto",
            # what a deployment gets by default: vLLM serves a float32 checkpoint in 16 bits
            # (bfloat16 on CPU); the rows say which
            dtype="auto",
            enforce_eager=True,
            max_model_len=min(1024, longest),
            seed=0,
        )
        # every prompt its own request, all queued at once: how a server meets its traffic
        started = time.perf_counter()
        outs = llm.generate(request["prompts"], params, use_tqdm=False)
        out["timing"][name] = {
            "seconds": time.perf_counter() - started,
            "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
        }
        out["continuations"][name] = [o.outputs[0].text for o in outs]
        out["dtype"][name] = str(llm.llm_engine.model_config.dtype).removeprefix("torch.")
        del llm
        gc.collect()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
