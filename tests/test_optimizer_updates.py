"""One optimizer per family, built by ``make_optimizer`` as sd-scripts would, against its update rule written out
by hand from the paper or package documentation (float64), over three steps with fixed gradients.

Three steps make the moment averages, bias corrections and adaptive step sizes matter; a wrong beta, epsilon,
default argument or missing weight decay moves the result far beyond the tolerances used here.
"""

from __future__ import annotations

import math

import pytest
import torch

from library.optimizers import make_optimizer

P0 = [1.0, -0.5, 0.25, 2.0]
SMALL = [x * 1e-5 for x in P0]  # D-Adaptation and Prodigy start with steps of about d0 = 1e-6: keep them resolvable
GRADS = [[0.5, -1.0, 2.0, 0.1], [0.4, -0.2, 1.5, -0.3], [0.6, 0.3, 1.0, 0.2]]


def stepped(name: str, lr: float, args: list[str] | None = None, p0=P0, grads=GRADS):
    """(parameter after one step per gradient in ``grads``, as float64; the optimizer). Gradients are set
    directly, not computed."""
    param = torch.nn.Parameter(torch.as_tensor(p0, dtype=torch.float32).clone())
    optimizer = make_optimizer(name, [param], lr, args).optimizer
    for g in grads:
        param.grad = torch.as_tensor(g, dtype=torch.float32).clone()
        optimizer.step()
    return param.detach().double(), optimizer


def run(name: str, lr: float, args: list[str] | None = None, p0=P0, grads=GRADS) -> torch.Tensor:
    """The parameter after the steps of :func:`stepped`."""
    return stepped(name, lr, args, p0, grads)[0]


def vec(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def adam_reference(lr: float, weight_decay: float, betas=(0.9, 0.999), eps=1e-8) -> torch.Tensor:
    """AdamW (Loshchilov & Hutter): decoupled decay, bias-corrected moments."""
    p, m, v = vec(P0), torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for t, g in enumerate(map(vec, GRADS), start=1):
        p = p * (1 - lr * weight_decay)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        p = p - lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
    return p


def test_adamw_three_steps():
    """Tolerance-based, so it holds for torch's foreach and fused implementations alike."""
    expected = adam_reference(0.1, 0.01)
    torch.testing.assert_close(run("AdamW", 0.1, ["weight_decay=0.01"]), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(run("AdamW", 0.1), adam_reference(0.1, 0.01), rtol=0, atol=1e-6)  # torch's default
    assert not torch.allclose(adam_reference(0.1, 0.0), expected, atol=1e-4)


def test_sgd_nesterov_three_steps():
    p, buf = vec(P0), None
    for g in map(vec, GRADS):
        buf = g if buf is None else 0.9 * buf + g
        p = p - 0.1 * (g + 0.9 * buf)
    torch.testing.assert_close(run("SGDNesterov", 0.1), p, rtol=0, atol=1e-6)


def test_lion_three_steps():
    """Lion (Chen et al.): step along sign(b1 m + (1 - b1) g), then m <- b2 m + (1 - b2) g; betas (0.9, 0.99)."""
    p, m = vec(P0), torch.zeros(4, dtype=torch.float64)
    for g in map(vec, GRADS):
        p = p - 0.1 * torch.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
    torch.testing.assert_close(run("Lion", 0.1), p, rtol=0, atol=1e-6)


def _rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


def adafactor_reference(p0: torch.Tensor, grads: list[torch.Tensor], lr: float | None) -> torch.Tensor:
    """Adafactor (Shazeer & Stern) with transformers' defaults: eps (1e-30, 1e-3), clip 1.0, decay rate -0.8, no
    first moment; factored second moment for matrices. ``lr=None``: relative step min(1e-2, 1/sqrt(t)) times
    max(1e-3, RMS(p))."""
    p = p0.clone()
    row = col = v = None
    for t, g in enumerate(grads, start=1):
        beta2 = 1 - t**-0.8
        u = g * g + 1e-30
        if p.dim() == 2:
            row = (1 - beta2) * u.mean(-1) if row is None else beta2 * row + (1 - beta2) * u.mean(-1)
            col = (1 - beta2) * u.mean(-2) if col is None else beta2 * col + (1 - beta2) * u.mean(-2)
            update = (row / row.mean()).rsqrt().unsqueeze(-1) * col.rsqrt().unsqueeze(0) * g
        else:
            v = (1 - beta2) * u if v is None else beta2 * v + (1 - beta2) * u
            update = v.rsqrt() * g
        update = update / max(1.0, _rms(update) / 1.0)
        step_lr = min(1e-2, 1 / math.sqrt(t)) * max(1e-3, _rms(p)) if lr is None else lr
        p = p - step_lr * update
    return p


@pytest.mark.parametrize("shape", [(4,), (2, 2)])
def test_adafactor_relative_step_and_fixed_lr(shape):
    p0 = vec(P0).reshape(shape)
    grads = [vec(g).reshape(shape) for g in GRADS]
    relative = run("AdaFactor", 1e-3, None, p0, grads)  # sd-scripts' default: relative_step=True
    torch.testing.assert_close(relative, adafactor_reference(p0, grads, None), rtol=0, atol=1e-7)
    fixed = run("AdaFactor", 0.05, ["relative_step=False", "scale_parameter=False"], p0, grads)
    torch.testing.assert_close(fixed, adafactor_reference(p0, grads, 0.05), rtol=0, atol=1e-6)


def test_dadapt_adam_estimates_d_from_the_gradients():
    """D-Adaptation Adam (Defazio & Mishchenko), package defaults: d0 1e-6, no bias correction, coupled decay 0.

    Steps use the current d; after each step d becomes max(d, sum_k dlr_k <g_k, s_{k-1} / denom> / |s_k|_1)."""
    b1, b2, d, eps = 0.9, 0.999, 1e-6, 1e-8
    sb2 = math.sqrt(b2)
    m, v, s = (torch.zeros(4, dtype=torch.float64) for _ in range(3))
    p = vec(SMALL)
    numerator = 0.0
    ds = []
    for g in map(vec, GRADS):
        dlr = d * 1.0
        numerator = sb2 * numerator + (1 - sb2) * dlr * float(g @ (s / (v.sqrt() + eps)))
        m = b1 * m + dlr * (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        s = sb2 * s + dlr * (1 - sb2) * g
        d = max(d, numerator / ((1 - sb2) * float(s.abs().sum())))
        ds.append(d)
        p = p - m / (v.sqrt() + eps)
    assert ds[0] == 1e-6 and ds[2] > ds[1] > 1e-6  # d grows while the gradients keep their direction
    param, optimizer = stepped("DAdaptAdam", 1.0, p0=SMALL)
    assert optimizer.param_groups[0]["d"] == pytest.approx(ds[-1], rel=1e-5)
    torch.testing.assert_close(param, p, rtol=1e-5, atol=1e-12)


def test_prodigy_estimates_d_from_the_distance_travelled():
    """Prodigy (Mishchenko & Defazio), package defaults: d0 1e-6, beta3 sqrt(b2), decoupled decay 0, d_coef 1.

    d_hat = sum_k beta3^(n-k) dlr_k <g_k, x0 - x_k> / |s|_1 with s <- beta3 s + d dlr g / d0; d = max(d, d_hat)."""
    b1, b2, d, d0, eps = 0.9, 0.999, 1e-6, 1e-6, 1e-8
    b3 = math.sqrt(b2)
    p = vec(SMALL)
    m, v, s = (torch.zeros(4, dtype=torch.float64) for _ in range(3))
    numerator = 0.0
    for g in map(vec, GRADS):
        dlr = d * 1.0
        numerator = b3 * numerator + (d / d0) * dlr * float(g @ (vec(SMALL) - p))
        m = b1 * m + d * (1 - b1) * g
        v = b2 * v + d * d * (1 - b2) * g * g
        s = b3 * s + (d / d0) * dlr * g
        d_hat = numerator / float(s.abs().sum())
        d = max(d, d_hat)
        p = p - dlr * m / (v.sqrt() + d * eps)
    assert d > 1e-6
    param, optimizer = stepped("Prodigy", 1.0, p0=SMALL)
    assert optimizer.param_groups[0]["d"] == pytest.approx(d, rel=1e-5)
    torch.testing.assert_close(param, p, rtol=1e-5, atol=1e-12)


def test_schedule_free_adamw_train_and_eval_points():
    """Schedule-free AdamW (Defazio et al.), constant lr and package defaults (betas 0.9/0.999, no warm-up):
    gradients at y = (1 - b1) z + b1 x; z <- z - lr g / (sqrt(v_hat) + eps); x <- x + (z - x) / t.
    In train mode the parameter holds y; ``eval()`` switches it to x."""
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    x = z = vec(P0)
    v = torch.zeros(4, dtype=torch.float64)
    for t, g in enumerate(map(vec, GRADS), start=1):
        v = b2 * v + (1 - b2) * g * g
        z = z - lr * g / ((v / (1 - b2**t)).sqrt() + eps)
        x = x + (z - x) / t
    y = (1 - b1) * z + b1 * x
    param = torch.nn.Parameter(torch.tensor(P0))
    optimizer = make_optimizer("AdamWScheduleFree", [param], lr).optimizer
    for g in GRADS:
        param.grad = torch.tensor(g)
        optimizer.step()
    torch.testing.assert_close(param.detach().double(), y, rtol=0, atol=1e-6)
    optimizer.eval()
    torch.testing.assert_close(param.detach().double(), x, rtol=0, atol=1e-6)
    assert not torch.allclose(x, y, atol=1e-3)


def test_adamw_8bit_follows_adamw_within_quantisation_error():
    """bitsandbytes keeps 8-bit blockwise-quantised moments for tensors of 4096+ elements (smaller ones stay 32-bit);
    its steps then follow AdamW to within the quantisation error, a small fraction of the step size."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(64, 64, generator=gen)
    grads = [torch.randn(64, 64, generator=gen) for _ in range(3)]
    results = {}
    for name in ("AdamW8bit", "AdamW"):
        param = torch.nn.Parameter(p0.clone())
        optimizer = make_optimizer(name, [param], 0.01, ["weight_decay=0.01"]).optimizer
        for g in grads:
            param.grad = g.clone()
            optimizer.step()
        results[name] = param.detach()
        if name == "AdamW8bit":
            assert optimizer.state[param]["state1"].dtype == torch.uint8  # the quantised path really ran
    moved = (results["AdamW"] - p0).abs()
    assert moved.mean() > 0.01  # three steps of about lr each
    error = (results["AdamW8bit"] - results["AdamW"]).abs()
    # measured: max 0.085 and mean 0.011 of lr; betas (0.85, 0.999) give a mean of 0.035, eps 1e-3 a max of 0.81
    assert error.max() < 0.15 * 0.01 and error.mean() < 0.015 * 0.01
