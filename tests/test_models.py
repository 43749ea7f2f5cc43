import pytest
import torch
from conftest import ARCH_TYPES, tiny_model

from exporter.models import (
    ARCHITECTURES,
    UnsupportedArchitecture,
    architecture_of,
    layer_output_hook,
)


def test_all_ten_architectures_are_registered():
    assert set(ARCH_TYPES) <= set(ARCHITECTURES)


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_adapter_reads_and_replaces_layer_output(model_type):
    model = tiny_model(model_type)
    arch = architecture_of(model)
    assert arch.num_layers(model) == 3
    assert arch.hidden_size(model) == 32
    writers = arch.residual_writers(model)
    assert len(writers) == len(arch.embeddings) + 2 * 3
    assert all(isinstance(m, torch.nn.Module) for _, m in writers)
    assert len(arch.residual_writers(model, upto=0)) == len(arch.embeddings) + 2

    ids = torch.randint(1, 128, (2, 10))
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
        seen = []
        with layer_output_hook(model, 1, lambda h: seen.append(h.clone())):
            same = model(ids).logits
        # Reading changes nothing, and what is read is the residual stream after layer 1.
        torch.testing.assert_close(same, ref.logits)
        torch.testing.assert_close(seen[0], ref.hidden_states[2])

        # Replacing with the identity leaves the logits; adding a large vector changes them.
        with layer_output_hook(model, 1, lambda h: h * 1.0):
            torch.testing.assert_close(model(ids).logits, ref.logits)
        push = torch.randn(32) * 50
        with layer_output_hook(model, 1, lambda h: h + push):
            moved = model(ids).logits
        assert (moved - ref.logits).abs().max() > 1e-2

        # Replacing only the last position leaves earlier logits (causal) and changes the last.
        def last_only(h):
            h = h.clone()
            h[:, -1] += push
            return h

        with layer_output_hook(model, 1, last_only):
            partial = model(ids).logits
        torch.testing.assert_close(partial[:, :-1], ref.logits[:, :-1])
        assert (partial[:, -1] - ref.logits[:, -1]).abs().max() > 1e-2

    # The hook is gone after the block.
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref.logits)


def test_hook_removed_after_exception():
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 5))

    def boom(h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with layer_output_hook(model, 0, boom):
            model(ids)
    model(ids)  # no hook left behind


def test_layer_out_of_range_names_the_range():
    model = tiny_model("qwen2")
    with pytest.raises(IndexError, match=r"0\.\.2"):
        with layer_output_hook(model, 3, lambda h: None):
            pass


def test_unsupported_architecture_lists_supported():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "opt",
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        ffn_dim=32,
        num_attention_heads=2,
        word_embed_proj_dim=16,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedArchitecture) as info:
        architecture_of(model)
    msg = str(info.value)
    assert "'opt'" in msg
    for name in ("llama", "gpt2", "gemma2", "olmo2", "gpt_neox"):
        assert name in msg


def test_load_local_hf_folder(tmp_path, tiny_tokenizer):
    from exporter.models import load_model
    from exporter.recipe import ModelSpec

    model = tiny_model("qwen2", vocab_size=len(tiny_tokenizer))
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(ModelSpec(path=str(tmp_path / "m"), dtype="bfloat16"))
    assert loaded.arch.name == "qwen2" and loaded.model.dtype == torch.bfloat16
    assert not loaded.model.training and loaded.path == str(tmp_path / "m")
    ids = torch.randint(1, 100, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(ids).logits.float(), model.to(torch.bfloat16)(ids).logits.float()
        )


def test_folder_without_config_and_offline_hub_errors(tmp_path, monkeypatch):
    from exporter.models import ModelLoadError, load_model
    from exporter.recipe import ModelSpec

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(ModelSpec(path=str(tmp_path / "empty")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelSpec(hub="nobody-here/no-such-model", revision="0123abc"))
    msg = str(info.value)
    assert "nobody-here/no-such-model@0123abc" in msg and "model.path" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_cuda_recipe_without_a_gpu_names_the_fix(tmp_path):
    from exporter.models import ModelLoadError, load_model
    from exporter.recipe.sources import ModelSpec

    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"model\.device: cpu .*auto"):
        load_model(ModelSpec(path=str(tmp_path), device="cuda"))
