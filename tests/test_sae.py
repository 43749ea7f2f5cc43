import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.sae_data import sparse_data

from exporter.activations import shuffled_batches
from exporter.recipe import SaeSection
from exporter.sae import (
    SAETrainingError,
    TopKSAE,
    geometric_median,
    load_sae,
    reconstruction_metrics,
    save_sae,
    train_sae,
)

CFG = SaeSection(
    k=4,
    expansion=4,
    k_aux=8,
    batch_size=256,
    train_tokens=256 * 150,
    warmup_steps=5,
    dead_tokens=2000,
    lr=3e-3,
    checkpoint_every=20,
)


def test_topk_encode_decode_agree():
    torch.manual_seed(0)
    sae = TopKSAE(8, 32, 3, norm_scale=1.7)
    x = torch.randn(5, 8)
    z = sae.encode(x)
    assert ((z > 0).sum(-1) <= 3).all()
    torch.testing.assert_close(sae.decode(z), sae(x))
    torch.testing.assert_close(sae.W_enc, sae.W_dec)  # encoder = decoder transpose at init
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    before_z, before_x = sae.encode(x), sae(x)
    sae.fold_scale()
    assert float(sae.norm_scale) == 1.0
    torch.testing.assert_close(sae.encode(x), before_z)
    torch.testing.assert_close(sae(x), before_x)


def test_geometric_median_resists_outliers():
    x = torch.zeros(101, 2)
    x[:100] = torch.randn(100, 2) * 0.01
    x[100] = torch.tensor([1000.0, 1000.0])
    assert geometric_median(x).norm() < 0.1 < x.mean(0).norm()


def test_trains_to_low_fvu_with_unit_decoder():
    x = sparse_data(8192, features=24, seed=0)
    cfg = CFG.model_copy(update={"train_tokens": 256 * 300})
    result = train_sae(
        shuffled_batches(x[:6144], cfg.batch_size, seed=1), x[:2048], cfg, progress=False
    )
    metrics = reconstruction_metrics(result.sae, x[6144:])
    assert metrics["fvu"] < 0.1, metrics
    # One held-out token at 100x the others' norm dominates the variance: measured as the trainer
    # and the patch treat it (left out, counted), the FVU is the SAE's on the rest.
    held = torch.cat([x[6144:], 100 * x[6144:6145].norm() * torch.ones(1, x.shape[1])])
    assert reconstruction_metrics(result.sae, held)["fvu"] > 0.5
    kept = reconstruction_metrics(result.sae, held, outlier_factor=20.0)
    assert kept["heldout_outliers"] == 1 and kept["tokens"] == len(held) - 1
    assert kept["fvu"] == pytest.approx(metrics["fvu"])
    assert metrics["l0"] <= 4
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert result.steps == 300 and 0 <= result.dead_fraction <= 1
    # Folded: decoder rows are 1/scale long, the scale recorded.
    torch.testing.assert_close(
        result.sae.W_dec.norm(dim=1), torch.full((64,), 1 / result.norm_scale)
    )


def test_save_load_sae_lens_format_identical(tmp_path):
    x = sparse_data(2048, seed=2)
    cfg = CFG.model_copy(update={"train_tokens": 256 * 10})
    sae = train_sae(shuffled_batches(x, cfg.batch_size, seed=1), x[:1024], cfg, progress=False).sae
    path = save_sae(sae, tmp_path / "sae", layer=3, model_name="tiny", extra={"norm_scale": 1.5})
    assert {p.name for p in path.iterdir()} == {"cfg.json", "sae_weights.safetensors"}
    loaded, cfg_json = load_sae(path)
    assert cfg_json["architecture"] == "topk" and cfg_json["d_sae"] == 64 and cfg_json["k"] == 4
    assert cfg_json["metadata"]["hook_layer"] == 3
    from safetensors.torch import load_file

    shapes = {
        k: tuple(v.shape) for k, v in load_file(str(path / "sae_weights.safetensors")).items()
    }
    assert shapes == {"W_enc": (16, 64), "W_dec": (64, 16), "b_enc": (64,), "b_dec": (16,)}
    assert torch.equal(loaded(x), sae(x)) and torch.equal(loaded.encode(x), sae.encode(x))
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path)


def test_resume_after_interruption_gives_the_same_sae(tmp_path):
    x = sparse_data(4096, seed=3)
    cfg = CFG.model_copy(update={"train_tokens": 256 * 60})
    straight = train_sae(
        shuffled_batches(x, cfg.batch_size, seed=1), x[:1024], cfg, progress=False
    ).sae

    def interrupted(stop_after):
        for i, b in enumerate(shuffled_batches(x, cfg.batch_size, seed=1)):
            if i == stop_after:
                raise KeyboardInterrupt
            yield b

    with pytest.raises(KeyboardInterrupt):
        train_sae(interrupted(45), x[:1024], cfg, workdir=tmp_path, progress=False)
    assert (tmp_path / "checkpoint.pt").exists()
    resumed = train_sae(
        shuffled_batches(x, cfg.batch_size, seed=1), x[:1024], cfg, workdir=tmp_path, progress=False
    ).sae
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_nan_and_divergence_stop_with_a_clear_message():
    x = sparse_data(1024)
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(SAETrainingError, match="NaN"):
        train_sae(shuffled_batches(x, 256, seed=0), bad, CFG, progress=False)

    def poisoned():
        for i, b in enumerate(shuffled_batches(x, 256, seed=0)):
            yield b * (float("inf") if i == 3 else 1.0)

    cfg = CFG.model_copy(update={"outlier_factor": 0.0})
    with pytest.raises(SAETrainingError, match=r"diverged at step 3.*sae\.lr"):
        train_sae(poisoned(), x, cfg, progress=False)


def test_auxk_trains_only_dead_latents():
    from exporter.sae import sae_loss as _loss

    torch.manual_seed(0)
    sae = TopKSAE(16, 64, 4)
    x = sparse_data(512, seed=4)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[40:] = True

    def grads(aux_coef):
        sae.zero_grad()
        _loss(sae, x, dead, 8, aux_coef)[0].backward()
        return sae.W_dec.grad.clone(), sae.W_enc.grad.clone()

    dec0, enc0 = grads(0.0)
    dec1, enc1 = grads(1.0)
    changed_dec = (dec1 - dec0).abs().sum(-1) > 1e-7
    changed_enc = (enc1 - enc0).abs().sum(-1) > 1e-7
    assert not changed_dec[~dead].any() and not changed_enc[~dead].any()
    assert changed_dec[dead].any() and changed_enc[dead].any()
    # Without dead latents there is no AuxK term at all.
    total, mse, *_ = _loss(sae, x, torch.zeros(64, dtype=torch.bool), 8, 1.0)
    assert torch.equal(total, mse)


def test_sparse_backward_matches_dense_autograd():
    """The loss's hand-written sparse backward gives the gradients plain autograd gives through a
    dense encoder pass (float32), for every parameter, with the AuxK term on."""
    from exporter.sae import sae_loss as _loss

    torch.manual_seed(0)
    sae = TopKSAE(16, 64, 4, norm_scale=1.3)
    with torch.no_grad():
        sae.b_pre.normal_()
        sae.b_enc.normal_(std=0.1)
    x = sparse_data(300, seed=5)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True

    def dense_loss():
        xn = x * sae.norm_scale
        pre = F.linear(xn - sae.b_pre, sae.W_enc, sae.b_enc)
        values, indices = pre.topk(sae.k, dim=-1, sorted=False)
        err = xn - (
            F.embedding_bag(indices, sae.W_dec, per_sample_weights=values.relu(), mode="sum")
            + sae.b_pre
        )
        dead_idx = dead.nonzero().squeeze(1)
        a_vals, a_pos = pre[:, dead_idx].topk(8, dim=-1, sorted=False)
        e_aux = F.embedding_bag(
            dead_idx[a_pos], sae.W_dec, per_sample_weights=a_vals.relu(), mode="sum"
        )
        target = err.detach()
        aux = (target - e_aux).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean()
        return err.pow(2).sum(-1).mean() / sae.d_in + 0.5 * aux

    def grads(fn):
        sae.zero_grad()
        fn().backward()
        return {n: p.grad.clone() for n, p in sae.named_parameters()}

    ours = grads(lambda: _loss(sae, x, dead, 8, 0.5)[0])
    reference = grads(dense_loss)
    for name, g in reference.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(ours[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_data_parallel_two_processes_match_one(tmp_path, monkeypatch):
    here = Path(__file__).parent
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    one = tmp_path / "one.pt"
    two = tmp_path / "two.pt"
    # one process: the worker's own code, here (it trains on one thread, as each rank does)
    monkeypatch.syspath_prepend(str(here / "helpers"))
    from sae_ddp_worker import main as train_alone

    threads = torch.get_num_threads()
    try:
        train_alone(str(one))
    finally:
        torch.set_num_threads(threads)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            str(here / "helpers" / "sae_ddp_worker.py"),
            str(two),
        ],
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = torch.load(one), torch.load(two)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4)
