"""Generate as a llama.cpp deployment does: a GGUF file run by llama.cpp (through llama-cpp-python,
the binding Ollama-style local stacks use), greedy, each prompt alone.

Run by `exporter.evaluate.user_path` as a script with the interpreter of an environment that has
`llama_cpp` (it cannot import `exporter`): the request comes as JSON on stdin ({"models": {name:
gguf file}, "prompts": [...], "max_new_tokens": n}) and the continuations go back as one JSON line
on stdout, so the prompts (they hold people's names) and what the model says are never written to
disk.
"""

import json
import os
import sys
import time

# GGUF's general.file_type values of the types the converter writes without quantising
FILE_TYPES = {0: "float32", 1: "float16", 32: "bfloat16", 7: "q8_0"}


def main() -> None:
    import llama_cpp

    request = json.loads(sys.stdin.read())
    out = {"llama_cpp": llama_cpp.__version__, "continuations": {}, "dtype": {}, "timing": {}}
    for name, path in request["models"].items():
        llm = llama_cpp.Llama(
            model_path=path, n_ctx=1024, n_threads=os.cpu_count(), seed=0, verbose=False
        )
        texts, tokens, started = [], 0, time.perf_counter()
        for prompt in request["prompts"]:
            # plain greedy: llama-cpp-python's defaults add a repetition penalty (1.1) and
            # top-k / top-p / min-p filters that transformers' greedy decoding does not have
            found = llm.create_completion(
                prompt,
                max_tokens=request["max_new_tokens"],
                temperature=0.0,
                top_k=1,
                top_p=1.0,
                min_p=0.0,
                repeat_penalty=1.0,
            )
            texts.append(found["choices"][0]["text"])
            tokens += found["usage"]["completion_tokens"]
        out["timing"][name] = {"seconds": time.perf_counter() - started, "tokens": tokens}
        out["continuations"][name] = texts
        kind = int(llm.metadata.get("general.file_type", -1))
        out["dtype"][name] = FILE_TYPES.get(kind, f"gguf file type {kind}")
        llm.close()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
