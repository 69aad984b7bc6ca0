"""Each pooling layer against a direct numpy implementation of its equations, plus its invariances."""
import numpy as np
import pytest
import torch

from features.pooling import POOLINGS, NetVLAD, NeXtVLAD

B, F_, D, K = 3, 7, 6, 4


def _inputs(seed=0, n_frames=F_, dim=D):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, n_frames, dim))
    mask = np.ones((B, n_frames), bool)
    mask[1, 4:] = False                     # padding at the end
    mask[2, [0, 3]] = False                 # faulty frames in the middle
    return x, mask


def _module(name, seed=0, **kw):
    torch.manual_seed(seed)
    dims = {"nextvlad": dict(expansion=2, groups=3)}.get(name, {})
    module = POOLINGS[name](D, K, **{**dims, **kw}).double().eval()
    with torch.no_grad():                   # move every parameter off its neutral start
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        if name == "nextvlad":
            module.assign.bn.running_mean.normal_()
            module.assign.bn.running_var.uniform_(0.5, 2.0)
    return module


def _run(module, x, mask):
    with torch.no_grad():
        return module(torch.from_numpy(x), torch.from_numpy(mask)).numpy()


def _p(t):
    return t.detach().numpy()


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _l2(v):
    n = np.sqrt((v ** 2).sum(-1, keepdims=True))
    return np.where(n > 0, v / np.maximum(n, 1e-12), 0.0)


def _assign(m, xi):                          # one frame (d,) -> (K,) with the bias form
    return _softmax(xi @ _p(m.assign.weight) + _p(m.assign.bias))


def _ref_vlad_family(name, m, x, mask):
    out = []
    for b in range(len(x)):
        k = m.assign.weight.shape[1]
        v = np.zeros((k, x.shape[2]))
        v2 = np.zeros((k, x.shape[2]))
        counts = np.zeros(k)
        for i in np.flatnonzero(mask[b]):
            a = _assign(m, x[b, i])
            counts += a
            for c in range(k):
                if name == "netvlad":
                    v[c] += a[c] * (x[b, i] - _p(m.centers)[c])
                elif name == "netrvlad":
                    v[c] += a[c] * x[b, i]
                elif name == "netfv":
                    var = _p(m.std)[c] ** 2 + m.eps
                    r = x[b, i] - _p(m.centers)[c]
                    v[c] += a[c] * r / np.sqrt(var)
                    v2[c] += a[c] * (r ** 2 / var - 1)
        if name == "softdbow":
            out.append(_l2(counts))
        elif name == "netfv":
            out.append(np.concatenate([_l2(_l2(v).ravel()), _l2(_l2(v2).ravel())]))
        else:
            out.append(_l2(_l2(v).ravel()))
    return np.stack(out)


def _ref_nextvlad(m, x, mask):
    we, be = _p(m.expand.weight).T, _p(m.expand.bias)
    wg, bg = _p(m.attention.weight).T, _p(m.attention.bias)
    bn = m.assign.bn
    g, gd = m.groups, m.group_dim
    k = m.centers.shape[0]
    out = []
    for b in range(len(x)):
        v = np.zeros((k, gd))
        for i in np.flatnonzero(mask[b]):
            xe = x[b, i] @ we + be                                      # (lam d,)
            att = 1 / (1 + np.exp(-(xe @ wg + bg)))                     # (G,)
            z = xe @ _p(m.assign.weight)
            z = (z - _p(bn.running_mean)) / np.sqrt(_p(bn.running_var) + bn.eps) * _p(bn.weight) + _p(bn.bias)
            a = _softmax(z.reshape(g, k))                               # (G, K)
            for gi in range(g):
                for c in range(k):
                    v[c] += a[gi, c] * att[gi] * (xe[gi * gd:(gi + 1) * gd] - _p(m.centers)[c])
        out.append(_l2(v).ravel())
    return np.stack(out)


@pytest.mark.parametrize("name", ["netvlad", "netrvlad", "softdbow", "netfv"])
def test_vlad_family_matches_numpy(name):
    x, mask = _inputs()
    m = _module(name)
    got = _run(m, x, mask)
    assert got.shape == (B, m.out_dim)
    np.testing.assert_allclose(got, _ref_vlad_family(name, m, x, mask), atol=1e-10)


def test_nextvlad_matches_numpy():
    x, mask = _inputs()
    m = _module("nextvlad")
    got = _run(m, x, mask)
    assert got.shape == (B, m.out_dim) and m.out_dim == K * 2 * D // 3
    np.testing.assert_allclose(got, _ref_nextvlad(m, x, mask), atol=1e-10)


@pytest.mark.parametrize("name", sorted(POOLINGS))
@pytest.mark.parametrize("training", [False, True])
def test_padding_changes_nothing(name, training):
    x, mask = _inputs()
    rng = np.random.default_rng(1)
    x_pad = np.concatenate([x, rng.normal(size=(B, 5, D)) * 100], axis=1)    # garbage padding
    mask_pad = np.concatenate([mask, np.zeros((B, 5), bool)], axis=1)
    m = _module(name).train(training)
    torch.manual_seed(0)
    np.testing.assert_allclose(_run(m, x_pad, mask_pad), _run(_module(name).train(training), x, mask),
                               atol=1e-10)


@pytest.mark.parametrize("name", sorted(POOLINGS))
def test_frame_order_changes_nothing(name):
    x, mask = _inputs()
    perm = np.random.default_rng(2).permutation(F_)
    m = _module(name)
    np.testing.assert_allclose(_run(m, x[:, perm], mask[:, perm]), _run(m, x, mask), atol=1e-10)


@pytest.mark.parametrize("name", sorted(POOLINGS))
def test_no_valid_frame_gives_finite_zeros_and_finite_gradients(name):
    x, mask = _inputs()
    mask[0] = False
    m = _module(name).train()
    xt = torch.from_numpy(x).requires_grad_()
    out = m(xt, torch.from_numpy(mask))
    assert torch.isfinite(out).all() and (out[0] == 0).all()
    assert out[1:].abs().sum() > 0
    out.pow(2).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert torch.isfinite(xt.grad).all()


def _hard_vlad(x, mask, centers):
    out = []
    for b in range(len(x)):
        v = np.zeros_like(centers)
        for i in np.flatnonzero(mask[b]):
            k = np.argmin(((x[b, i] - centers) ** 2).sum(-1))
            v[k] += x[b, i] - centers[k]
        out.append(_l2(_l2(v).ravel()))
    return np.stack(out)


def test_netvlad_tends_to_hard_assignment_vlad():
    """With w_k = 2 alpha c_k, b_k = -alpha |c_k|^2 the softmax sharpens to nearest-centre VLAD."""
    x, mask = _inputs()
    centers = np.random.default_rng(3).normal(size=(K, D))
    hard = _hard_vlad(x, mask, centers)
    errors = []
    for alpha in [1.0, 10.0, 100.0, 1000.0]:
        m = NetVLAD(D, K).double()
        with torch.no_grad():
            m.centers.copy_(torch.from_numpy(centers))
            m.assign.weight.copy_(torch.from_numpy(2 * alpha * centers.T))
            m.assign.bias.copy_(torch.from_numpy(-alpha * (centers ** 2).sum(1)))
        errors.append(np.abs(_run(m, x, mask) - hard).max())
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-8 and errors[0] > 1e-2


def test_nextvlad_refuses_groups_that_do_not_divide():
    with pytest.raises(ValueError, match="divisible"):
        NeXtVLAD(5, 4, expansion=1, groups=2)
