"""The torch.optim.Optimizer contract, checked against torch's own optimizers on the same model and data."""


import pytest
import torch

import ds_optim
from ds_optim import CPUAdam, FusedAdam, FusedAdagrad, FusedAdamW, FusedLamb, FusedLion

CPU_BACKENDS = ds_optim.available_backends("cpu")


def _tolerance(backend):
    # The torch backend follows torch's op order exactly. Compiled kernels round differently in the last bit
    # of a step (the conformance suite pins that down on fixed inputs); here the training loop feeds each
    # step's params back into the next gradients, which amplifies those ulps over the steps.
    return dict(rtol=0, atol=0) if backend == "torch" else dict(rtol=1e-3, atol=1e-4)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 5),
                               torch.nn.LayerNorm(5))


def _train(model, opt, steps=6, seed=1, zero_none=True, scheduler=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 13, generator=g)
        opt.zero_grad(set_to_none=zero_none)
        model(x).square().mean().backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return model


def _assert_same_params(a, b, backend):
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, **_tolerance(backend))


def _groups(model, **second):
    params = list(model.parameters())
    return [{"params": params[:2]}, {"params": params[2:], **second}]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("zero_none", [True, False])
def test_adamw_matches_torch_with_per_group_hyperparameters(backend, zero_none):
    ref, ours = _model(), _model()
    torch_opt = torch.optim.AdamW(_groups(ref, lr=3e-3, weight_decay=0.5), lr=1e-2, foreach=False)
    our_opt = FusedAdamW(_groups(ours, lr=3e-3, weight_decay=0.5), lr=1e-2, backend=backend)
    _train(ref, torch_opt, zero_none=zero_none)
    _train(ours, our_opt, zero_none=zero_none)
    _assert_same_params(ref, ours, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_adam_l2_mode_and_maximize_match_torch(backend):
    ref, ours = _model(), _model()
    _train(ref, torch.optim.Adam(ref.parameters(), lr=1e-2, weight_decay=0.1, maximize=True, foreach=False))
    _train(ours, FusedAdam(ours.parameters(), lr=1e-2, weight_decay=0.1, adam_w_mode=False, maximize=True,
                           backend=backend))
    _assert_same_params(ref, ours, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_adagrad_matches_torch(backend):
    ref, ours = _model(), _model()
    kw = dict(lr=5e-2, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)
    _train(ref, torch.optim.Adagrad(ref.parameters(), foreach=False, **kw))
    _train(ours, FusedAdagrad(ours.parameters(), backend=backend, **kw))
    _assert_same_params(ref, ours, backend)


def _lion_reference(params, grads, m, lr, b1, b2, wd):
    for p, g, mi in zip(params, grads, m):
        c = mi * b1 + g * (1 - b1)
        p.mul_(1 - lr * wd).add_(torch.sign(c), alpha=-lr)
        mi.mul_(b2).add_(g, alpha=1 - b2)


def _lamb_reference(params, grads, m, v, step, lr, b1, b2, eps, wd, max_coeff, min_coeff):
    for p, g, mi, vi in zip(params, grads, m, v):
        mi.mul_(b1).add_(g, alpha=1 - b1)
        vi.mul_(b2).addcmul_(g, g, value=1 - b2)
        u = mi / (vi.sqrt() + eps) + wd * p
        pn, un = p.norm().item(), u.norm().item()
        coeff = min(max(pn / un, min_coeff), max_coeff) if pn > 0 and un > 0 else 1.0
        p.sub_(u * (lr * (1 - b2**step) ** 0.5 / (1 - b1**step) * coeff))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lion_and_lamb_match_independent_references(backend):
    for cls, kw in ((FusedLion, dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)),
                    (FusedLamb, dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_coeff=5.0,
                                     min_coeff=0.05))):
        model = _model()
        ref = [p.detach().clone() for p in model.parameters()]
        opt = cls(model.parameters(), backend=backend, **kw)
        m = [torch.zeros_like(p) for p in ref]
        v = [torch.zeros_like(p) for p in ref]
        gen = torch.Generator().manual_seed(3)
        for step in range(1, 5):
            grads = [torch.randn(p.shape, generator=gen) for p in ref]
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
            if cls is FusedLion:
                _lion_reference(ref, grads, m, kw["lr"], *kw["betas"], kw["weight_decay"])
            else:
                _lamb_reference(ref, grads, m, v, step, kw["lr"], *kw["betas"], kw["eps"], kw["weight_decay"],
                                kw["max_coeff"], kw["min_coeff"])
        for p, r in zip(model.parameters(), ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)
        if cls is FusedLamb:
            assert len(opt.get_lamb_coeffs()) == len(ref)


def test_state_dict_moves_between_torch_adamw_and_ours():
    ref, ours = _model(), _model()
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    _train(ref, torch_opt, steps=3)
    ours.load_state_dict(ref.state_dict())
    our_opt = FusedAdamW(ours.parameters(), lr=1e-2, backend="torch")
    our_opt.load_state_dict(torch_opt.state_dict())  # torch -> ours
    _train(ref, torch_opt, steps=3, seed=5)
    _train(ours, our_opt, steps=3, seed=5)
    _assert_same_params(ref, ours, "torch")
    back = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    back.load_state_dict(our_opt.state_dict())  # ours -> torch
    for a, b in zip(torch_opt.state.values(), back.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and float(a["step"]) == float(b["step"]) == 6
    sd = our_opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    # a copy, not a view of the flat buffer (torch.save would write the whole buffer per view)
    assert sd["state"][0]["exp_avg"].untyped_storage().nbytes() == sd["state"][0]["exp_avg"].numel() * 4


def test_lr_schedulers_drive_it():
    ref, ours = _model(), _model()
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    our_opt = FusedAdamW(ours.parameters(), lr=1e-2, backend="torch")
    _train(ref, torch_opt, scheduler=torch.optim.lr_scheduler.StepLR(torch_opt, 2, gamma=0.5))
    _train(ours, our_opt, scheduler=torch.optim.lr_scheduler.StepLR(our_opt, 2, gamma=0.5))
    _assert_same_params(ref, ours, "torch")
    assert our_opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_scaler_unscales_and_skips_on_inf(backend):
    ref, ours = _model(), _model()
    opts = [torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False), FusedAdamW(ours.parameters(), lr=1e-2,
                                                                                   backend=backend)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000) for _ in opts]
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(16, 13, generator=gen)
        for model, opt, scaler in zip((ref, ours), opts, scalers):
            opt.zero_grad()
            loss = model(x).square().mean()
            if step == 2:
                loss = loss * float("inf")  # an overflowing step: must be skipped
            scaler.scale(loss).backward()
            before = [p.detach().clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            if step == 2:
                assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert scalers[1].get_scale() == scalers[0].get_scale() == 512.0
    _assert_same_params(ref, ours, "numba")  # the scaler unscales torch's grads by multiplying: ulp-level
    assert all(float(s["step"]) == 3 for s in opts[1].state.values())


def test_add_param_group_frozen_params_and_params_without_grads():
    ref, ours = _model(), _model()
    for m in (ref, ours):
        m[3].weight.requires_grad_(False)  # frozen at construction
    torch_opt = torch.optim.AdamW(list(ref[0].parameters()) + [ref[3].weight], lr=1e-2, foreach=False)
    our_opt = FusedAdamW(list(ours[0].parameters()) + [ours[3].weight], lr=1e-2, backend="torch")
    _train(ref, torch_opt, steps=2)
    _train(ours, our_opt, steps=2)
    assert ours[3].weight not in our_opt.state and torch.equal(ours[3].weight, ref[3].weight)
    for m, opt in ((ref, torch_opt), (ours, our_opt)):
        opt.add_param_group({"params": list(m[2].parameters()), "lr": 5e-3})
        m[3].weight.requires_grad_(True)  # unfrozen later: trained one by one
    _train(ref, torch_opt, steps=2, seed=7)
    _train(ours, our_opt, steps=2, seed=7)
    _assert_same_params(ref, ours, "torch")
    # a param used only on some steps keeps its own step count, as in torch
    for model, opt in ((ref, torch_opt), (ours, our_opt)):
        for step in range(3):
            opt.zero_grad()
            out = model[0](torch.ones(2, 13))
            if step == 1:
                out = model[2](torch.tanh(model[1](out)))  # model[1] is not in the optimizer
            out.sum().backward()
            opt.step()
    _assert_same_params(ref, ours, "torch")
    assert [float(s["step"]) for s in our_opt.state.values()] == [float(s["step"]) for s in torch_opt.state.values()]


def test_one_launch_per_bucket_and_params_live_in_flat_buffers(monkeypatch):
    model = _model()
    opt = FusedAdamW(model.parameters(), lr=1e-2, backend="torch")
    calls = []
    kernels = opt.kernels_for(torch.device("cpu"))
    original = kernels.adam
    monkeypatch.setattr(kernels, "adam", lambda *a, **k: (calls.append(a[0].numel()), original(*a, **k)))
    _train(model, opt, steps=2, zero_none=False)
    n = sum(p.numel() for p in model.parameters())
    assert calls == [n, n]  # 6 tensors, one launch per step
    flat = opt._buckets[0][0]
    for p in model.parameters():
        assert flat.param_flat.data_ptr() <= p.data_ptr() < flat.param_flat.data_ptr() + n * 4
        assert p.grad.data_ptr() != 0 and p.grad._base is flat.grad_flat  # grads stay in the flat buffer


def test_bad_input_is_refused_like_torch():
    p = torch.nn.Parameter(torch.randn(3))
    for kwargs, message in [(dict(lr=-1.0), "Invalid learning rate"), (dict(eps=-1e-8), "Invalid epsilon"),
                            (dict(betas=(1.0, 0.9)), "beta parameter at index 0"),
                            (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
                            (dict(weight_decay=-0.1), "Invalid weight_decay"),
                            (dict(amsgrad=True), "amsgrad=True is not supported")]:
        with pytest.raises(ValueError, match=message):
            FusedAdamW([p], **kwargs)
    with pytest.raises(ValueError, match="complex parameters"):
        FusedAdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="one device"):
        FusedAdamW([p, torch.nn.Parameter(torch.empty(3, device="meta"))])
    with pytest.raises(ValueError, match="unknown ds-optim kernel backend"):
        FusedAdamW([p], backend="nope")
    if "cupy" not in ds_optim.available_backends("cuda"):
        with pytest.raises(ImportError, match="pip install"):
            FusedAdamW([p], backend="cupy")
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = FusedAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    with pytest.raises(ValueError, match="min_coeff"):
        FusedLamb([p], min_coeff=2.0, max_coeff=1.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("copy_dtype", [torch.bfloat16, torch.float16])
def test_cpu_adam_writes_the_16bit_copy_in_the_same_step(backend, copy_dtype):
    ref, ours = _model(), _model()
    _train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0, foreach=False))
    opt = CPUAdam(ours.parameters(), lr=1e-2, copy_dtype=copy_dtype, pin_memory=False, backend=backend)
    _train(ours, opt)
    _assert_same_params(ref, ours, backend)
    for p in ours.parameters():
        assert torch.equal(opt.copy_of(p), p.detach().to(copy_dtype))  # round to nearest even, bit for bit
    assert sum(t.numel() for t in opt.flat_copies()) == sum(p.numel() for p in ours.parameters())
    with pytest.raises(ValueError, match="fp32 on the CPU"):
        CPUAdam([torch.nn.Parameter(torch.randn(3).bfloat16())])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", [FusedAdamW, FusedLamb, FusedLion])
def test_step_with_supplied_low_precision_grads_equals_widened_grads(backend, cls):
    """``step(grads=...)``: bf16 grads for fp32 params give exactly the update of the same values widened to fp32
    and set as ``.grad`` (the kernels widen exactly), with no flat grad buffer ever allocated and ``.grad`` left
    alone; a param whose grad is None is not stepped; two params in one group take the staged copy."""
    torch.manual_seed(0)
    shapes = [(7, 5), (11,), (3, 3)]
    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    groups = lambda ps: [{"params": ps[:1]}, {"params": ps[1:], "lr": 3e-3}]  # noqa: E731
    opt_a, opt_b = cls(groups(a), lr=1e-2, backend=backend), cls(groups(b), lr=1e-2, backend=backend)
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        low = [torch.randn(s, generator=g).to(torch.bfloat16) for s in shapes]
        if step == 2:
            low[2] = None  # no grad this step: that param is not stepped (and its step count stays)
        opt_a.step(grads=low)
        for p, gl in zip(b, low):
            p.grad = None if gl is None else gl.float()
        opt_b.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
        assert pa.grad is None
    for buckets in opt_a._buckets:
        assert not any(bucket.holds_grad_buffer for bucket in buckets)
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    for i in sb:
        for key in sb[i]:
            torch.testing.assert_close(sa[i][key], sb[i][key], rtol=0, atol=0)


def test_step_with_supplied_grads_refuses_a_wrong_count_or_shape():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = FusedAdamW([p], lr=1e-2)
    with pytest.raises(ValueError, match="got 2 grads for 1 params"):
        opt.step(grads=[torch.zeros(4), torch.zeros(4)])
    with pytest.raises(ValueError, match=r"a grad of shape \(5,\)"):
        opt.step(grads=[torch.zeros(5)])
    assert float(opt.state_dict()["state"].get(0, {}).get("step", 0)) == 0
