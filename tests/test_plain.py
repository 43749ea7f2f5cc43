"""Plain export: the linear part of a patch in the base architecture's own weights, loaded without
remote code."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model

from exporter.patch.checkpoint_files import safetensors_header
from exporter.patch.plain import PlainExportError, orthonormal_basis, projected, write_plain

LAYER = 1


def _raw_tensors(folder) -> dict[str, bytes]:
    """Every tensor's bytes as stored, over the folder's safetensors files."""
    out = {}
    for path in folder.glob("*.safetensors"):
        header, start = safetensors_header(path)
        data = path.read_bytes()
        out.update(
            {
                k: data[start + v["data_offsets"][0] : start + v["data_offsets"][1]]
                for k, v in header.items()
                if k != "__metadata__"
            }
        )
    return out


def _inputs(model, seed: int = 0):
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(5, d, generator=g)
    # rank 4: the projector spans what the rows span
    directions[4] = directions[0] - 2 * directions[1]
    return (
        directions,
        torch.randn(d, generator=g),
        torch.randint(0, model.config.vocab_size, (2, 12), generator=g),
    )


@pytest.mark.parametrize(
    "model_type, steer", [("llama", True), ("gpt2", True), ("qwen2", False), ("mistral", False)]
)
def test_plain_export_loads_with_stock_transformers_and_equals_the_projection(
    model_type, steer, tmp_path
):
    from transformers import AutoModelForCausalLM

    # a tied LM head must survive the projected embedding
    base = tiny_model(model_type, tie_word_embeddings=True)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith(".bias"):  # initialised to zero, which a projection leaves unchanged
                p.normal_(0, 0.1)
    base.save_pretrained(tmp_path / "base")
    directions, s, ids = _inputs(base)
    s = s if steer else None
    out = write_plain(tmp_path / "base", tmp_path / "plain", directions, LAYER, steer=s)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == model_type and "auto_map" not in cfg and not list(out.glob("*.py"))
    assert cfg["scalpel_plain"]["rank"] == 4 and cfg["tie_word_embeddings"] is False
    plain, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    with torch.no_grad():
        got = plain.eval()(ids, output_hidden_states=True)
        with projected(base, LAYER, directions, s):
            want = base(ids, output_hidden_states=True)
        plain_base = base(ids).logits
    h = got.hidden_states[LAYER + 1]
    torch.testing.assert_close(h, want.hidden_states[LAYER + 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got.logits, plain_base, atol=1e-3)  # the edit does something
    # Layer l hands on (I - P_A) h + s: nothing of the stream is left in the span of the directions.
    rest = h - (s if s is not None else 0)
    assert (rest @ orthonormal_basis(directions)).abs().max() < 1e-5 * rest.abs().max()

    before, after = _raw_tensors(tmp_path / "base"), _raw_tensors(out)
    changed = set(cfg["scalpel_plain"]["edited"])
    assert after.keys() == before.keys() | set(cfg["scalpel_plain"]["added"])
    for name, raw in before.items():
        assert (after[name] != raw) == (name in changed), name  # untouched tensors byte-identical
    assert all(f".{LAYER + 1}." not in n for n in changed)  # nothing after layer l


def test_plain_export_loads_in_a_fresh_process(tmp_path):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    directions, s, ids = _inputs(base)
    out = write_plain(tmp_path / "base", tmp_path / "plain", directions, LAYER, steer=s)
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM; m = "
        "AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); "
        "torch.save(m(torch.load(sys.argv[2])).logits.detach(), sys.argv[3])"
    )
    subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(out),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "logits.pt"),
        ],
        check=True,
    )
    with torch.no_grad(), projected(base, LAYER, directions, s):
        want = base(ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want, rtol=1e-5, atol=1e-5)


def test_plain_export_from_a_later_layer_keeps_what_earlier_layers_wrote(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    directions, s, ids = _inputs(base)
    # the last layer's hidden state has the final norm applied: not that one
    layer, first = (
        LAYER,
        1,
    )
    out = write_plain(
        tmp_path / "base", tmp_path / "plain", directions, layer, steer=s, first_layer=first
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["scalpel_plain"]["first_layer"] == first
    changed = set(cfg["scalpel_plain"]["edited"])
    assert changed and all(".layers.1." in n for n in changed)  # not the embeddings, not layer 0
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids, output_hidden_states=True)
        with projected(base, layer, directions, s, first_layer=first):
            want = base(ids, output_hidden_states=True)
        entering = base(ids, output_hidden_states=True).hidden_states[first]
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    # the stream entering layer `first` is the base's
    torch.testing.assert_close(got.hidden_states[first], entering)
    # Layer l hands on h - P_A (h - h_entering) + s: what layers first..l added has nothing left
    # along A.
    added = got.hidden_states[layer + 1] - s - entering
    assert (added @ orthonormal_basis(directions)).abs().max() < 1e-5 * added.abs().max()
    assert (
        entering @ orthonormal_basis(directions)
    ).abs().max() > 1e-2  # ...while the earlier part is kept
    with pytest.raises(PlainExportError, match="plain_from is 2"):
        write_plain(tmp_path / "base", tmp_path / "plain3", directions, layer, first_layer=2)


@pytest.mark.parametrize(
    "model_type, steer, message",
    [
        ("gemma2", False, "per-channel weights"),  # post-norms: no weight edit projects the stream
        ("qwen2", True, "cannot carry the steering vector"),  # no MLP bias and no switch for one
    ],
)
def test_plain_export_says_what_it_cannot_do_and_writes_nothing(
    model_type, steer, message, tmp_path
):
    base = tiny_model(model_type)
    base.save_pretrained(tmp_path / "base")
    directions, s, _ = _inputs(base)
    with pytest.raises(PlainExportError, match=message):
        write_plain(
            tmp_path / "base", tmp_path / "plain", directions, LAYER, steer=s if steer else None
        )
    assert not (tmp_path / "plain").exists() and [p.name for p in tmp_path.iterdir()] == ["base"]


def test_plain_export_refuses_a_folder_without_safetensors_and_an_existing_output(tmp_path):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    directions, _, _ = _inputs(base)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlainExportError, match="no safetensors"):
        write_plain(tmp_path / "empty", tmp_path / "plain", directions, LAYER)
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_plain(tmp_path / "base", tmp_path / "plain", directions, LAYER)
    with pytest.raises(PlainExportError, match="out of range"):
        write_plain(tmp_path / "base", tmp_path / "plain2", directions, 9)
