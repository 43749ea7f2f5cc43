"""Run under torchrun (or alone): train a small SAE on fixed synthetic data, save the weights."""

import os
import sys

import torch
import torch.distributed as dist
from sae_data import sparse_data

from exporter.recipe import SaeSection
from exporter.sae import train_sae


def main(out: str) -> None:
    torch.set_num_threads(1)
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    x = sparse_data(4096, seed=0)
    from exporter.activations import shuffled_batches

    # fp32: compare exactly
    cfg = SaeSection(
        k=4,
        expansion=4,
        k_aux=8,
        batch_size=256,
        train_tokens=256 * 40,
        warmup_steps=5,
        dead_tokens=2000,
        lr=3e-3,
        bf16_encoder=False,
    )
    result = train_sae(shuffled_batches(x, cfg.batch_size, seed=1), x[:1024], cfg, progress=False)
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(result.sae.state_dict(), out)
    if dist.is_initialized():
        dist.barrier()  # no rank tears its connections down while another still uses them
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # The weights are saved and the process group destroyed. Under load, a rank has aborted in the
    # interpreter's teardown ("terminate called without an active exception", SIGABRT), failing a
    # run whose work was done; leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
