"""Configuration of a scalpel-patched checkpoint: the base architecture's config under its own model_type.

The model_type differs from the base's so that loading without `trust_remote_code` fails instead of
silently returning the unpatched model. The export writes the base config class name in below.
"""

from transformers import LlamaConfig as BaseConfig  # scalpel:base-config


class ScalpelConfig(BaseConfig):
    model_type = "scalpel_llama"  # scalpel:model-type
