"""SAELens loads the SAE we save and computes what ours computes (slow; skipped unless
SCALPEL_SAELENS_PYTHON names an interpreter with `sae_lens` installed: it pulls transformer-lens,
datasets and wandb, so it lives in a venv of its own, e.g. `python -m venv --system-site-packages V
&& V/bin/pip install "torch==2.13.0" sae-lens`)."""

import json
import os
import subprocess

import pytest
import torch
from helpers.sae_data import sparse_data
from safetensors.torch import load_file, save_file
from test_sae import CFG

from exporter.activations import shuffled_batches
from exporter.evaluate.user_path import has_module
from exporter.sae import load_sae, save_sae, train_sae

pytestmark = pytest.mark.slow

SAELENS_PYTHON = os.environ.get("SCALPEL_SAELENS_PYTHON", "")

# Runs in the SAELens venv: SAELens's own loader, encode and decode on the activations we give it.
SCRIPT = """
import json, sys
import sae_lens
from safetensors.torch import load_file, save_file
from sae_lens import SAE
folder, acts, out = sys.argv[1:]
sae = SAE.load_from_disk(folder, device="cpu")
x = load_file(acts)["x"]
z = sae.encode(x)
out_tensors = {"z": z, "x_hat": sae.decode(z), "forward": sae(x)}
save_file({k: v.contiguous() for k, v in out_tensors.items()}, out)
meta = sae.cfg.metadata
print("RESULT " + json.dumps({"version": sae_lens.__version__, "class": type(sae).__name__,
    "k": sae.cfg.k, "hook_name": getattr(meta, "hook_name", None),
    "model_name": getattr(meta, "model_name", None)}))
"""


@pytest.mark.skipif(
    not (SAELENS_PYTHON and has_module(SAELENS_PYTHON, "sae_lens")),
    reason="SCALPEL_SAELENS_PYTHON does not name a python with sae_lens installed",
)
def test_saelens_loads_our_sae_and_encodes_and_decodes_as_ours(tmp_path):
    x = sparse_data(4096, seed=3)
    cfg = CFG.model_copy(update={"train_tokens": 256 * 60})
    trained = train_sae(shuffled_batches(x, cfg.batch_size, seed=1), x[:1024], cfg, progress=False)
    assert trained.norm_scale != 1.0  # the input scale folded into the saved weights
    folder = save_sae(trained.sae, tmp_path / "sae", layer=3, model_name="tiny-llama")
    ours, _ = load_sae(folder)
    held_out = sparse_data(512, seed=4)
    save_file({"x": held_out}, str(tmp_path / "acts.safetensors"))
    proc = subprocess.run(
        [SAELENS_PYTHON, "-c", SCRIPT, str(folder), str(tmp_path / "acts.safetensors"),
         str(tmp_path / "theirs.safetensors")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.rsplit("RESULT ", 1)[1])
    print(f"\nsae_lens {info['version']}: {info['class']}")
    assert info["class"] == "TopKSAE" and info["k"] == CFG.k
    # the 6.x layout keeps what the SAE was trained on (a pre-6.0 reading drops it)
    assert info["hook_name"] == "model.layers.3" and info["model_name"] == "tiny-llama"
    theirs = load_file(str(tmp_path / "theirs.safetensors"))
    with torch.no_grad():
        z = ours.encode(held_out)
        assert torch.equal(z != 0, theirs["z"] != 0)  # the same latents fire
        torch.testing.assert_close(theirs["z"], z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs["x_hat"], ours.decode(z), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs["forward"], ours(held_out), rtol=1e-5, atol=1e-5)
