"""A causal LM with the scalpel PII patch inserted at one decoder layer.

The base architecture's own classes; decoder layer `l` runs its own forward and then the patch on
the hidden state it returns (see scalpel_patch.py), so the patch sees that hidden state and nothing
of the generation machinery. The patch tensors are checked against the sha256 in config.json when
loaded, as are these code files (their source read back through the import system that loaded them).

The decoder stack's tensors are stored under `scalpel_<prefix>.` instead of the base's own prefix
(`model.`, `transformer.`, ...), data unchanged: the base's own class, or a tool that picks a class
from the architecture name, finds none of them in these files and cannot silently return the
unpatched model. Where it looks for its input embeddings it finds a one-number tensor instead, so it
stops with a size-mismatch error (fail closed); these classes ignore it. The head keeps its standard
name, `lm_head.`: engines that build their own head around `AutoModel` (vLLM's Transformers backend,
which loads this stack with the patch inside it) find it there.

Imports only torch, transformers, the stdlib's hashlib and importlib, and the files beside it; opens
no file and no connection.
"""

from transformers import LlamaForCausalLM as BaseForCausalLM  # scalpel:base-model
from transformers import LlamaModel as BaseModel  # scalpel:base-body

from .scalpel_patch import ScalpelPatch, insert, patch_of, storage, stored_name, verify, verify_code

BODY = BaseForCausalLM.base_model_prefix  # the attribute the causal LM keeps its decoder stack in
# {attribute: where its tensors are stored}, the stack's and the head's
STORED = storage(BaseForCausalLM)


def _no_split(cls) -> list:
    """The base's unsplittable layer classes, and their patched kinds (named Scalpel<name>), for
    device maps."""
    names = list(getattr(cls, "_no_split_modules", None) or [])
    return names + [f"Scalpel{n}" for n in names]


def _insert_patch(body, config) -> None:
    """Insert the patch the config describes into the decoder stack `body`."""
    spec = config.scalpel_patch
    path = spec["layers_path"]
    layers = body.get_submodule(path[len(BODY) + 1 :] if path.startswith(BODY + ".") else path)
    insert(
        layers[spec["layer"]],
        ScalpelPatch(
            spec["d_model"],
            spec["n_ablate"],
            spec["mode"],
            spec.get("d_sae", 0),
            spec.get("k", 0),
            spec.get("context_gate", False),
            spec.get("context_hidden", 0),
        ),
    )


def _checked(loaded):
    model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
    verify(patch_of(model), model.config.scalpel_patch["sha256"])
    verify_code(model.config.scalpel_patch.get("code_sha256"), __package__)
    return loaded


class ScalpelModel(BaseModel):
    """The decoder stack alone (AutoModel), patched: what engines that bring their own head load."""

    base_model_prefix = STORED[BODY]
    _no_split_modules = _no_split(BaseModel)
    # The fail-closed markers under the base's own names. Not the causal LM's head: an engine that
    # builds its own head around this stack reads this list too, and would drop the head's tensors.
    _keys_to_ignore_on_load_unexpected = [rf"^{BODY}\.", r"^scalpel\."]
    # The patch gates are thresholds: keep them (and their maths) in float32 in a bf16 / fp16 model.
    _keep_in_fp32_modules_strict = list(
        getattr(BaseModel, "_keep_in_fp32_modules_strict", None) or []
    ) + ["scalpel_patch"]

    def __init__(self, config):
        super().__init__(config)
        _insert_patch(self, config)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return _checked(super().from_pretrained(*args, **kwargs))


class ScalpelForCausalLM(BaseForCausalLM):
    base_model_prefix = STORED[BODY]
    _no_split_modules = _no_split(BaseForCausalLM)
    _keys_to_ignore_on_load_unexpected = [rf"^{BODY}\.", r"^scalpel\."]  # the fail-closed markers
    _keep_in_fp32_modules_strict = list(
        getattr(BaseForCausalLM, "_keep_in_fp32_modules_strict", None) or []
    ) + ["scalpel_patch"]
    _tied_weights_keys = (
        {
            stored_name(k, STORED): stored_name(v, STORED)
            for k, v in BaseForCausalLM._tied_weights_keys.items()
        }
        if isinstance(BaseForCausalLM._tied_weights_keys, dict)
        else BaseForCausalLM._tied_weights_keys
    )

    def __init__(self, config):
        super().__init__(config)
        _insert_patch(self._modules[STORED[BODY]], config)

    def __setattr__(self, name, value):
        # The base class's __init__ assigns its decoder stack and head to their usual attributes;
        # they are kept (and their tensors saved and loaded) under the stored names, and read back
        # through the properties below.
        super().__setattr__(STORED.get(name, name), value)

    @property
    def scalpel_patch(self) -> ScalpelPatch:
        return patch_of(self)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return _checked(super().from_pretrained(*args, **kwargs))


def _alias(stored: str) -> property:
    return property(lambda self: self._modules[stored])


# The base class's forward, generate and helpers read the stack and the head under their usual
# names.
for _attribute, _stored in STORED.items():
    setattr(ScalpelForCausalLM, _attribute, _alias(_stored))
