"""ds-optim under DDP (gloo, real processes): same parameters as torch.optim.AdamW on the same DDP run."""

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from torch.nn.parallel import DistributedDataParallel as DDP

import ds_optim


def _train(optimizer_name, bucket_view, zero_none, backend):
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                              torch.nn.ReLU(), torch.nn.Linear(64, 3))
    model = DDP(net, bucket_cap_mb=0.01, gradient_as_bucket_view=bucket_view)  # several buckets
    if optimizer_name == "torch":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    else:
        opt = ds_optim.FusedAdamW(model.parameters(), lr=1e-2, weight_decay=0.05, backend=backend)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(8):
        x = torch.randn(32, 20, generator=gen)
        opt.zero_grad(set_to_none=zero_none)
        torch.nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("bucket_view,zero_none", [(False, True), (False, False), (True, True)])
@pytest.mark.parametrize("backend", ds_optim.available_backends("cpu"))
def test_ddp_with_fused_adamw_matches_torch_adamw(bucket_view, zero_none, backend):
    expected = run_distributed(_train, 2, "torch", bucket_view, zero_none, backend)
    got = run_distributed(_train, 2, "ds-optim", bucket_view, zero_none, backend)
    assert torch.equal(got[0], got[1]), "replicas diverged"
    tol = dict(rtol=0, atol=0) if backend == "torch" else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], expected[0], **tol)
