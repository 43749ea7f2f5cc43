import torch


def sparse_data(
    n: int, d: int = 16, features: int = 48, active: int = 3, seed: int = 0
) -> torch.Tensor:
    """Rows that are sparse non-negative combinations of `features` random unit directions, plus an
    offset."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(features, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(features, generator=g)[:active] for _ in range(n)])
    coef = torch.rand(n, active, generator=g) * 2 + 0.5
    return (coef[..., None] * dirs[idx]).sum(1) + 0.3
