"""bfloat16 only where the hardware computes it: a speed setting asking for it runs in float32 on
a CPU that would emulate it."""

import pytest
import torch
from conftest import tiny_model

from exporter import precision
from exporter.models import cast_copy

AVX2 = {"architecture": "x86_64", "avx2": True, "avx512_bf16": False, "amx_bf16": False}


@pytest.mark.parametrize(
    "caps, native",
    [
        (AVX2, False),
        ({**AVX2, "avx512_bf16": True}, True),
        ({**AVX2, "amx_bf16": True}, True),
        ({"architecture": "aarch64", "asimd_bf16": True}, True),
        ({"architecture": "aarch64"}, False),
    ],
)
def test_bfloat16_settings_fall_back_to_float32_where_emulated(cpu_caps, caps, native):
    cpu_caps(caps)
    assert precision.fast_bfloat16("cpu") is native
    assert precision.compute_dtype("bfloat16") == ("bfloat16" if native else "float32")
    assert precision.compute_dtype("float32") == "float32"
    assert (precision.precision_note() is None) is native
    model = tiny_model("llama")
    cast = cast_copy(model, "bfloat16")
    # emulated: the model itself, no float32 copy made; native: a bfloat16 copy
    assert (cast is model) is not native
    assert next(cast.parameters()).dtype == (torch.bfloat16 if native else torch.float32)
    # float32 asked for stays float32 either way
    assert cast_copy(model, "float32") is model


def test_the_note_names_the_fallback(cpu_caps):
    cpu_caps(AVX2)
    note = precision.precision_note("cpu")
    assert "emulated" in note and "float32" in note
    assert precision.recipe_device("cpu") == "cpu"
    assert precision.recipe_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
