"""A causal LM with the scalpel PII patch after one decoder layer.

The base architecture's own class and weights (unchanged, under their names); the patch tensors live
under `scalpel_patch.` and are checked against the sha256 in config.json when loaded, as are these
code files (their source read back through the import system that loaded them). Imports only torch,
transformers, the stdlib's hashlib and importlib, and the files beside it; opens no file and no connection.
"""

from transformers import LlamaForCausalLM as BaseForCausalLM  # scalpel:base-model

from .configuration_scalpel import ScalpelConfig
from .scalpel_patch import ScalpelPatch, attach, verify, verify_code


class ScalpelForCausalLM(BaseForCausalLM):
    config_class = ScalpelConfig
    # The patch gates are thresholds: keep them (and their maths) in float32 in a bf16 / fp16 model.
    _keep_in_fp32_modules_strict = list(getattr(BaseForCausalLM, "_keep_in_fp32_modules_strict", None) or []) + [
        "scalpel_patch"]

    def __init__(self, config):
        super().__init__(config)
        spec = config.scalpel_patch
        self.scalpel_patch = ScalpelPatch(spec["d_model"], spec["n_ablate"], spec["mode"], spec.get("d_sae", 0),
                                          spec.get("k", 0), spec.get("context_gate", False))
        layer = self.get_submodule(spec["layers_path"])[spec["layer"]]
        self._scalpel_hooks = attach(self, layer, self.scalpel_patch)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        verify(model.scalpel_patch, model.config.scalpel_patch["sha256"])
        verify_code(model.config.scalpel_patch.get("code_sha256"), __package__)
        return loaded
