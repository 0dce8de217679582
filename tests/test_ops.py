"""The fused ops of csrc/ against their plain-PyTorch references in semi/ops.py, and the references against
hand-computed cases.

Kernel tests run wherever the extension is built (and the build is checked to be loaded); CUDA cases run
only with a GPU and a CUDA build.
"""

import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F

from semi import ops

HAS_EXT = ops.extension_available()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason=f"extension not built: {ops.extension_error()}")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.extension_compiled_with_cuda() else [])
DTYPES = [torch.float32, torch.float64]


def tolerances(dtype):
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}


def make_noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values in a tensor that is not contiguous (every other column of a wider one)."""
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    out = wide[..., ::2]
    assert not out.is_contiguous() or x.numel() <= 1
    return out


# --------------------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------------------


def test_extension_is_loaded_when_built():
    built = importlib.util.find_spec("semi._C") is not None
    expected = built or os.environ.get("SSOD_EXPECT_EXT") == "1"
    if os.environ.get("SSOD_DISABLE_EXT") == "1":
        assert not HAS_EXT
        return
    if not expected:
        pytest.skip("no semi._C build on the path and SSOD_EXPECT_EXT is not set")
    assert HAS_EXT, f"semi._C was built but does not load: {ops.extension_error()}"
    assert isinstance(torch.ops.ssod_ops.compiled_with_cuda(), bool)


# --------------------------------------------------------------------------------------------------------
# ghm_kl
# --------------------------------------------------------------------------------------------------------


def _binary_kl(p_t: float, p_s: float) -> float:
    return p_t * math.log(p_t / p_s) + (1 - p_t) * math.log((1 - p_t) / (1 - p_s))


def test_ghm_kl_reference_golden_sigmoid():
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    s = [0.0, 1.0, -2.0, 3.0]
    t = [0.5, 1.0, 2.0, -3.0]
    bins = 4
    kl = [_binary_kl(sig(b), sig(a)) for a, b in zip(s, t)]
    g = [abs(sig(a) - sig(b)) for a, b in zip(s, t)]  # 0.12, 0, 0.76, 0.90
    bin_of = [min(int(x * bins), bins - 1) for x in g]
    assert bin_of == [0, 0, 3, 3]
    expected = sum(k / bin_of.count(b) for k, b in zip(kl, bin_of)) / bins
    out = ops.ghm_kl_reference(torch.tensor([s], dtype=torch.float64), torch.tensor([t], dtype=torch.float64),
                               mode="sigmoid", bins=bins)
    assert out.counts.tolist() == [2, 0, 0, 2]
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)


def test_ghm_kl_reference_golden_softmax():
    s = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    p_s, p_t = s.softmax(-1), t.softmax(-1)
    kl0 = sum(p_t[0, c] * math.log(p_t[0, c] / p_s[0, c]) for c in range(3)).item()
    g0 = 0.5 * (p_s[0] - p_t[0]).abs().sum().item()  # 0.5752
    out = ops.ghm_kl_reference(s, t, mode="softmax", bins=2)
    assert out.counts.tolist() == [1, 1]  # row 1: identical distributions, g = 0
    assert g0 > 0.5
    assert out.loss.item() == pytest.approx((kl0 / 1 + 0.0) / 2, rel=1e-12)


def test_ghm_kl_g_exactly_zero_and_one():
    # g = 0 (equal logits) in the first bin, g = 1 (saturated, opposite) in the last, for both paths.
    s = torch.tensor([[0.0, 3.0, 100.0, -100.0]])
    t = torch.tensor([[0.0, 3.0, -100.0, 100.0]])
    for fn in (ops.ghm_kl_reference, ops.ghm_kl_with_counts):
        out = fn(s, t, mode="sigmoid", bins=10)
        assert out.counts.tolist() == [2] + [0] * 8 + [2]
        assert torch.isfinite(out.loss)
        assert out.loss.item() == pytest.approx(200.0 / 2 / 10, rel=1e-5)  # two KL of 200 over R = 2, M = 10


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (37, 13), (2048, 81)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_ghm_kl_matches_reference(device, dtype, mode, shape, contiguous):
    gen = torch.Generator().manual_seed(sum(shape) + len(mode))
    s = (torch.randn(shape, generator=gen, dtype=dtype) * 3).to(device)
    t = (torch.randn(shape, generator=gen, dtype=dtype) * 3).to(device)
    if not contiguous:
        s, t = make_noncontiguous(s), make_noncontiguous(t)
    s_kernel = s.detach().clone().requires_grad_()
    s_ref = s.detach().clone().requires_grad_()
    out = ops.ghm_kl_with_counts(s_kernel, t, mode=mode, bins=10)
    ref = ops.ghm_kl_reference(s_ref, t, mode=mode, bins=10)
    assert out.loss.shape == () and out.loss.dtype == dtype
    assert out.counts.dtype == torch.int64 and out.counts.shape == (10,)
    assert torch.equal(out.counts.cpu(), ref.counts.cpu())
    torch.testing.assert_close(out.loss, ref.loss, **tolerances(dtype))
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(s_kernel.grad, s_ref.grad, **tolerances(dtype))


@needs_ext
@pytest.mark.parametrize("bins", [1, 3, 50])
def test_ghm_kl_bins(bins):
    gen = torch.Generator().manual_seed(bins)
    s, t = torch.randn(300, 7, generator=gen) * 2, torch.randn(300, 7, generator=gen) * 2
    out = ops.ghm_kl_with_counts(s, t, mode="sigmoid", bins=bins)
    ref = ops.ghm_kl_reference(s, t, mode="sigmoid", bins=bins)
    assert torch.equal(out.counts, ref.counts) and out.counts.sum().item() == s.numel()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-7)


@needs_ext
@pytest.mark.parametrize("bins", [1, 3, 17, 33, 50])
def test_ghm_kl_bins_forward_and_backward(bins):
    # The CPU kernel takes different paths by the number of bins (bin sums by vector compares up to 32 bins,
    # scattered beyond; the backward's weights by a lane-wise table lookup up to 32 bins, gathered beyond),
    # and the vector loops run on whole vectors with a scalar remainder: 5000 elements exercise both.
    gen = torch.Generator().manual_seed(bins)
    s, t = torch.randn(1000, 5, generator=gen) * 3, torch.randn(1000, 5, generator=gen) * 3
    s_kernel, s_ref = s.clone().requires_grad_(), s.clone().requires_grad_()
    out = ops.ghm_kl_with_counts(s_kernel, t, mode="sigmoid", bins=bins)
    ref = ops.ghm_kl_reference(s_ref, t, mode="sigmoid", bins=bins)
    assert torch.equal(out.counts, ref.counts)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-7)
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(s_kernel.grad, s_ref.grad, rtol=1e-5, atol=1e-9)


def check_softmax_rows(rows: int, classes: int, dtype: torch.dtype) -> None:
    """Softmax ghm_kl on (rows, classes) logits against the reference: counts, loss and gradient."""
    gen = torch.Generator().manual_seed(classes)
    s = torch.randn(rows, classes, generator=gen, dtype=dtype) * 3
    t = torch.randn(rows, classes, generator=gen, dtype=dtype) * 3
    s_kernel, s_ref = s.clone().requires_grad_(), s.clone().requires_grad_()
    out = ops.ghm_kl_with_counts(s_kernel, t, mode="softmax", bins=10)
    ref = ops.ghm_kl_reference(s_ref, t, mode="softmax", bins=10)
    assert torch.equal(out.counts, ref.counts)
    torch.testing.assert_close(out.loss, ref.loss, **tolerances(dtype))
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(s_kernel.grad, s_ref.grad, **tolerances(dtype))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [2, 8, 15, 16, 17, 32, 80, 81, 1500])
def test_ghm_kl_softmax_row_widths(dtype, classes):
    # The CPU kernel reads a row as vectors of up to 16 classes, the last one overlapping the one before (or
    # padded, for rows shorter than a vector); rows wider than 1024 classes go one class at a time.
    check_softmax_rows(67, classes, dtype)


@needs_ext
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_ghm_kl_extreme_logits_in_the_vector_loops(mode):
    # Saturated and huge logits spread over whole vectors (not only the scalar remainder).
    gen = torch.Generator().manual_seed(7)
    s = torch.randn(96, 40, generator=gen) * 60
    t = torch.randn(96, 40, generator=gen) * 60
    s[::3] = 100.0
    t[::5] = -100.0
    s_kernel, s_ref = s.clone().requires_grad_(), s.clone().requires_grad_()
    out = ops.ghm_kl_with_counts(s_kernel, t, mode=mode, bins=10)
    ref = ops.ghm_kl_reference(s_ref, t, mode=mode, bins=10)
    out.loss.backward()
    ref.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(s_kernel.grad).all()
    assert torch.equal(out.counts, ref.counts)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_kernel.grad, s_ref.grad, rtol=1e-5, atol=1e-9)


def test_ghm_kl_g_exactly_zero_and_one_in_the_vector_loops():
    s = torch.tensor([0.0, 3.0, 100.0, -100.0]).repeat(256).reshape(16, 64)
    t = torch.tensor([0.0, 3.0, -100.0, 100.0]).repeat(256).reshape(16, 64)
    out = ops.ghm_kl_with_counts(s, t, mode="sigmoid", bins=10)
    assert out.counts.tolist() == [512] + [0] * 8 + [512]
    assert out.loss.item() == pytest.approx(200.0 / 2 / 10, rel=1e-5)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ghm_kl_extreme_logits_are_finite(mode, dtype):
    s = torch.tensor([[100.0, -100.0, 0.0, 100.0], [-100.0, 100.0, 50.0, -50.0]], dtype=dtype, requires_grad=True)
    t = torch.tensor([[-100.0, 100.0, 0.0, 100.0], [100.0, -100.0, -50.0, 50.0]], dtype=dtype)
    out = ops.ghm_kl_with_counts(s, t, mode=mode, bins=10)
    ref = ops.ghm_kl_reference(s, t, mode=mode, bins=10)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(s.grad).all()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.counts, ref.counts)


def test_ghm_kl_teacher_and_counts_get_no_gradient():
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    ops.ghm_kl(s, t, mode="softmax").backward()
    assert t.grad is None and s.grad is not None
    assert not ops.ghm_kl_with_counts(s, t, mode="softmax").counts.requires_grad


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_ghm_kl_is_deterministic_across_runs_and_thread_counts(mode):
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(3000, 100, generator=gen), torch.randn(3000, 100, generator=gen)
    first = ops.ghm_kl(s, t, mode=mode)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.equal(first, ops.ghm_kl(s, t, mode=mode))
    finally:
        torch.set_num_threads(threads)


@needs_ext
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_ghm_kl_gradcheck(mode):
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: ops.ghm_kl(x, t, mode=mode, bins=4), (s,))


def test_ghm_kl_bad_input():
    with pytest.raises(ValueError, match="mode"):
        ops.ghm_kl(torch.zeros(2, 2), torch.zeros(2, 2), mode="tanh")
    with pytest.raises(ValueError, match="same shape"):
        ops.ghm_kl(torch.zeros(2, 2), torch.zeros(2, 3), mode="sigmoid")
    with pytest.raises(ValueError, match="float32"):
        ops.ghm_kl(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64), mode="sigmoid")


@needs_ext
def test_kernel_checks_give_clear_errors():
    s = torch.zeros(4, 6)
    with pytest.raises(RuntimeError, match="ghm_kl: student must be contiguous"):
        torch.ops.ssod_ops.ghm_kl(s.t(), s.t().contiguous(), "sigmoid", 10)
    with pytest.raises(RuntimeError, match="ghm_kl: teacher .* must be Float"):
        torch.ops.ssod_ops.ghm_kl(s, s.double(), "sigmoid", 10)
    with pytest.raises(RuntimeError, match="frs_topk_mask: k must be in"):
        torch.ops.ssod_ops.frs_topk_mask(s, 5)
    with pytest.raises(RuntimeError, match="refine_stats: label 7"):
        torch.ops.ssod_ops.refine_stats(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 4), torch.tensor([7]),
                                        [10.0, 10.0, 5.0, 5.0], 4.0)



# ghm_kl_forward keeps the unweighted gradient dKL / ds (and, in softmax mode, every row's bin) so that the
# backward is an in-place multiply (ghm_kl_weight_); ghm_kl_backward recomputes the same numbers.


def _reference_dkl_and_bins(s, t, mode, bins):
    """p_s - p_t per element (sigmoid) or per class (softmax), and the bin of every sample."""
    if mode == "sigmoid":
        d = torch.sigmoid(s) - torch.sigmoid(t)
        g = d.abs()
    else:
        d = torch.softmax(s, dim=-1) - torch.softmax(t, dim=-1)
        g = 0.5 * d.abs().sum(dim=-1)
    return d, (g * bins).floor().long().clamp_(max=bins - 1)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (37, 13), (67, 81), (301, 7)])
def test_ghm_kl_forward_keeps_the_gradient(dtype, mode, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    s = torch.randn(shape, generator=gen, dtype=dtype) * 3
    t = torch.randn(shape, generator=gen, dtype=dtype) * 3
    loss, counts, dkl, sample_bins = torch.ops.ssod_ops.ghm_kl_forward(s, t, mode, 10)
    plain_loss, plain_counts = torch.ops.ssod_ops.ghm_kl(s, t, mode, 10)
    assert torch.equal(loss, plain_loss) and torch.equal(counts, plain_counts)  # the same pass
    d, bins = _reference_dkl_and_bins(s, t, mode, 10)
    assert dkl.shape == s.shape and dkl.dtype == dtype
    torch.testing.assert_close(dkl, d, **tolerances(dtype))
    assert sample_bins.dtype == torch.int32
    if mode == "sigmoid":
        assert sample_bins.shape == (0,)
    else:
        assert torch.equal(sample_bins.long(), bins)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("bins", [1, 10, 33, 50])
@pytest.mark.parametrize("shape", [(1, 1), (37, 13), (67, 81), (1000, 5), (20, 300)])
def test_ghm_kl_weight_equals_the_recomputed_backward(dtype, mode, bins, shape):
    # The in-place weighting of the forward's dkl and the backward that recomputes it from the logits give
    # the same numbers, bit for bit (bins up to 32 take a table lookup on the CPU, more a gather).
    gen = torch.Generator().manual_seed(bins + sum(shape))
    s = torch.randn(shape, generator=gen, dtype=dtype) * 3
    t = torch.randn(shape, generator=gen, dtype=dtype) * 3
    grad = torch.tensor(0.37, dtype=dtype)
    _, counts, dkl, sample_bins = torch.ops.ssod_ops.ghm_kl_forward(s, t, mode, bins)
    recomputed = torch.ops.ssod_ops.ghm_kl_backward(grad, s, t, counts, mode, bins)
    torch.ops.ssod_ops.ghm_kl_weight_(dkl, sample_bins, grad, counts, mode, bins)
    assert torch.equal(dkl, recomputed)
    s_ref = s.clone().requires_grad_()
    (grad * ops.ghm_kl_reference(s_ref, t, mode=mode, bins=bins).loss).backward()
    torch.testing.assert_close(dkl, s_ref.grad, **tolerances(dtype))


@needs_ext
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_ghm_kl_backward_twice_with_retain_graph(mode):
    # The first backward hands the forward's buffer over as the gradient; a second backward of the same
    # graph recomputes it, with the same result.
    gen = torch.Generator().manual_seed(3)
    s = (torch.randn(300, 81, generator=gen) * 3).requires_grad_()
    t = torch.randn(300, 81, generator=gen) * 3
    loss = 2.5 * ops.ghm_kl(s, t, mode=mode)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward()
    assert torch.equal(s.grad, first + first)
    s_ref = s.detach().clone().requires_grad_()
    (2.5 * ops.ghm_kl_reference(s_ref, t, mode=mode, bins=10).loss).backward()
    torch.testing.assert_close(first, s_ref.grad, rtol=1e-5, atol=1e-9)


@needs_ext
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_ghm_kl_without_grad_gives_the_same_loss(mode):
    gen = torch.Generator().manual_seed(4)
    s, t = torch.randn(500, 81, generator=gen), torch.randn(500, 81, generator=gen)
    with_grad = ops.ghm_kl_with_counts(s.clone().requires_grad_(), t, mode=mode)
    with torch.no_grad():
        without = ops.ghm_kl_with_counts(s.clone().requires_grad_(), t, mode=mode)
    assert torch.equal(with_grad.loss.detach(), without.loss) and torch.equal(with_grad.counts, without.counts)
    assert with_grad.loss.requires_grad and not without.loss.requires_grad


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [16, 127, 128, 129, 200, 1024, 1025])
def test_ghm_kl_softmax_row_widths_around_the_cpu_paths(dtype, classes):
    # Softmax rows up to 128 classes go 16 rows at a time on the CPU, wider ones two at a time, and beyond
    # 1024 classes one class at a time; 37 rows leave a partial group.
    check_softmax_rows(37, classes, dtype)


@needs_ext
def test_ghm_kl_large_sigmoid_forward_and_backward():
    # More than 16 MB of gradient: the CPU forward writes it past the caches (streaming stores).
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(4100, 1025, generator=gen) * 3
    t = torch.randn(4100, 1025, generator=gen) * 3
    s_kernel, s_ref = s.clone().requires_grad_(), s.clone().requires_grad_()
    out = ops.ghm_kl_with_counts(s_kernel, t, mode="sigmoid", bins=10)
    ref = ops.ghm_kl_reference(s_ref, t, mode="sigmoid", bins=10)
    assert torch.equal(out.counts, ref.counts)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-7)
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(s_kernel.grad, s_ref.grad, rtol=1e-5, atol=1e-12)


@needs_ext
def test_ghm_kl_large_gradients_are_not_shared():
    # The CPU kernel hands the memory of a freed large gradient (16 MB or more) out again for the next one of
    # the same size: a gradient still alive must keep its values, and a reused buffer must give the same
    # result as a fresh one.
    gen = torch.Generator().manual_seed(7)
    s, t = torch.randn(4100, 1025, generator=gen), torch.randn(4100, 1025, generator=gen)
    other = torch.randn(4100, 1025, generator=gen)

    def gradient(x):
        x = x.clone().requires_grad_()
        ops.ghm_kl(x, t, mode="sigmoid").backward()
        return x.grad

    first = gradient(s)
    kept = first.clone()
    second = gradient(other)  # `first` is alive: its memory must not be reused
    assert torch.equal(first, kept)
    del first, kept
    again = gradient(other)  # may reuse the memory of `first`
    assert torch.equal(again, second)


@needs_ext
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_ghm_kl_gradient_is_deterministic_across_thread_counts(mode):
    gen = torch.Generator().manual_seed(6)
    s, t = torch.randn(3000, 100, generator=gen), torch.randn(3000, 100, generator=gen)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            x = s.clone().requires_grad_()
            ops.ghm_kl(x, t, mode=mode).backward()
            grads.append(x.grad)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@needs_ext
def test_ghm_kl_weight_checks_give_clear_errors():
    s = torch.zeros(4, 6)
    _, counts, dkl, sample_bins = torch.ops.ssod_ops.ghm_kl_forward(s, s, "softmax", 10)
    with pytest.raises(RuntimeError, match=r"ghm_kl_weight_: sample_bins must be \(4,\)"):
        torch.ops.ssod_ops.ghm_kl_weight_(dkl, sample_bins[:2], torch.tensor(1.0), counts, "softmax", 10)
    with pytest.raises(RuntimeError, match="ghm_kl_weight_: counts must be"):
        torch.ops.ssod_ops.ghm_kl_weight_(dkl, sample_bins, torch.tensor(1.0), counts[:3], "softmax", 10)
    with pytest.raises(RuntimeError, match="ghm_kl_weight_: dkl must be contiguous"):
        torch.ops.ssod_ops.ghm_kl_weight_(dkl.t(), sample_bins, torch.tensor(1.0), counts, "softmax", 10)


# --------------------------------------------------------------------------------------------------------
# jitter_boxes / refine_stats
# --------------------------------------------------------------------------------------------------------


def _random_boxes(n, dtype, gen):
    xy = torch.rand(n, 2, generator=gen, dtype=dtype) * 100
    wh = torch.rand(n, 2, generator=gen, dtype=dtype) * 50
    wh[: n // 4] *= 0.01  # some degenerate boxes, sides below 1 (clamped to 1)
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 17, 1001])
def test_jitter_boxes_matches_reference(device, dtype, n):
    boxes = _random_boxes(n, dtype, torch.Generator().manual_seed(n)).to(device)
    gen_a = torch.Generator(device=device).manual_seed(5)
    gen_b = torch.Generator(device=device).manual_seed(5)
    out = ops.jitter_boxes(boxes, times=10, scale=0.06, generator=gen_a)
    ref = ops.jitter_boxes_reference(boxes, times=10, scale=0.06, generator=gen_b)
    assert out.shape == (10, n, 4) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **tolerances(dtype))


def test_jitter_boxes_statistics():
    boxes = torch.tensor([[10.0, 20.0, 110.0, 70.0], [5.0, 5.0, 5.5, 5.2]], dtype=torch.float64)
    out = ops.jitter_boxes(boxes, times=20000, scale=0.06, generator=torch.Generator().manual_seed(0))
    offsets = out - boxes  # (T, N, 4)
    expected_std = torch.tensor([[6.0, 3.0, 6.0, 3.0], [0.06, 0.06, 0.06, 0.06]], dtype=torch.float64)
    torch.testing.assert_close(offsets.std(dim=0), expected_std, rtol=0.03, atol=0)
    torch.testing.assert_close(offsets.mean(dim=0), torch.zeros(2, 4, dtype=torch.float64), rtol=0, atol=0.15)


def test_refine_stats_golden():
    # Zero deltas: the refined boxes are the jittered boxes themselves.
    jittered = torch.tensor([[[0.0, 0.0, 10.0, 20.0]], [[2.0, 4.0, 12.0, 20.0]], [[1.0, 2.0, 14.0, 26.0]]],
                            dtype=torch.float64)  # (T=3, N=1, 4)
    deltas = torch.zeros(3, 1, 2, 4, dtype=torch.float64)
    deltas[:, :, 0] = 5.0  # the other class's deltas must be ignored
    labels = torch.tensor([1])
    for fn in (ops.refine_stats_reference, ops.refine_stats):
        out = fn(deltas, jittered, labels)
        mean = torch.tensor([[1.0, 2.0, 12.0, 22.0]], dtype=torch.float64)
        std = torch.tensor([1.0, 2.0, 2.0, math.sqrt(12.0)], dtype=torch.float64)  # unbiased, over 3 copies
        expected = (std / torch.tensor([11.0, 20.0, 11.0, 20.0], dtype=torch.float64)).mean()
        torch.testing.assert_close(out.mean_boxes, mean)
        torch.testing.assert_close(out.uncertainty, expected.reshape(1))


def test_refine_stats_decodes_like_faster_rcnn():
    box = torch.tensor([[[10.0, 10.0, 30.0, 50.0]]] * 2, dtype=torch.float64)  # (T=2, N=1, 4), w 20, h 40
    deltas = torch.tensor([[10.0, -10.0, 5.0 * math.log(2.0), 100.0]], dtype=torch.float64).reshape(1, 1, 1, 4)
    deltas = deltas.expand(2, 1, 1, 4).contiguous()
    for fn in (ops.refine_stats_reference, ops.refine_stats):
        out = fn(deltas, box, torch.tensor([0]))
        # centre (20, 30) -> (40, -10); w 20 -> 40; dh clamped at log(1000/16): h 40 -> 2500
        expected = torch.tensor([[20.0, -1260.0, 60.0, 1240.0]], dtype=torch.float64)
        torch.testing.assert_close(out.mean_boxes, expected)
        assert out.uncertainty.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 17, 300])
@pytest.mark.parametrize("flat", [True, False])
def test_refine_stats_matches_reference(device, dtype, n, flat):
    gen = torch.Generator().manual_seed(n + 1)
    times, num_classes = 10, 7
    boxes = ops.jitter_boxes_reference(_random_boxes(n, dtype, gen), times=times, scale=0.06, generator=gen)
    deltas = torch.randn(times, n, num_classes, 4, generator=gen, dtype=dtype)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    boxes, deltas, labels = boxes.to(device), deltas.to(device), labels.to(device)
    if flat:
        deltas = deltas.reshape(times * n, num_classes, 4)
    else:
        deltas = make_noncontiguous(deltas)
    out = ops.refine_stats(deltas, boxes, labels)
    ref = ops.refine_stats_reference(deltas, boxes, labels)
    assert out.mean_boxes.shape == (n, 4) and out.uncertainty.shape == (n,)
    torch.testing.assert_close(out.mean_boxes, ref.mean_boxes, **tolerances(dtype))
    # A float32 std of coordinates ~100 carries ~1e-5 absolute rounding in either implementation.
    tol = tolerances(dtype) if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
    torch.testing.assert_close(out.uncertainty, ref.uncertainty, **tol)


def test_refine_stats_bad_input():
    boxes = torch.zeros(10, 3, 4)
    with pytest.raises(ValueError, match="times >= 2"):
        ops.refine_stats(torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 4), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels must lie"):
        ops.refine_stats(torch.zeros(30, 2, 4), boxes, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="refined_deltas must be"):
        ops.refine_stats(torch.zeros(30, 2, 3), boxes, torch.tensor([0, 1, 1]))


# --------------------------------------------------------------------------------------------------------
# frs_topk_mask / frs_qfl
# --------------------------------------------------------------------------------------------------------


def test_frs_reference_golden():
    logits = torch.tensor([[0.0, 1.0], [3.0, -1.0], [1.0, 1.0], [2.0, 0.5], [-5.0, -4.0]])
    out = ops.frs_topk_mask_reference(logits, ratio=0.6)  # k = int(5 * 0.6) = 3
    # maxima 1, 3, 1, 2, -4: rows 1, 3, then the tie at 1 goes to row 0 (lower index) over row 2
    assert out.mask.tolist() == [True, True, False, True, False]
    expected = sum(1 / (1 + math.exp(-x)) for x in (1.0, 3.0, 2.0))
    assert out.fg.item() == pytest.approx(expected, rel=1e-6)


def _check_frs(logits, ratio):
    out = ops.frs_topk_mask(logits, ratio=ratio)
    ref = ops.frs_topk_mask_reference(logits, ratio=ratio)
    k = int(logits.shape[0] * ratio)
    assert out.mask.dtype == torch.bool and out.mask.shape == (logits.shape[0],)
    assert int(out.mask.sum()) == k
    assert torch.equal(out.mask.cpu(), ref.mask.cpu())
    torch.testing.assert_close(out.fg, ref.fg, **tolerances(logits.dtype))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 80), (1, 1), (1, 7), (999, 13), (50_000, 8)])
@pytest.mark.parametrize("ratio", [0.01, 0.5, 1.0])
@pytest.mark.parametrize("contiguous", [True, False])
def test_frs_topk_mask_matches_reference(device, dtype, shape, ratio, contiguous):
    gen = torch.Generator().manual_seed(shape[0])
    logits = (torch.randn(shape, generator=gen, dtype=dtype) * 4).to(device)
    if not contiguous:
        logits = make_noncontiguous(logits)
    _check_frs(logits, ratio)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [15, 16, 17, 80, 81])
def test_frs_topk_mask_row_widths(dtype, classes):
    # The CPU kernel reads rows of at least 16 classes as vectors, the last one overlapping the one before;
    # put each row's maximum in every position, the overlapped lanes included.
    gen = torch.Generator().manual_seed(classes)
    logits = torch.randn(3000, classes, generator=gen, dtype=dtype)
    rows = torch.arange(3000)
    logits[rows, rows % classes] += 5.0
    _check_frs(logits, 0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_frs_topk_mask_ties(device, dtype):
    # All scores equal: the first k rows.
    out = _check_frs(torch.full((1000, 5), 0.25, dtype=dtype, device=device), 0.1)
    assert out.mask[:100].all() and not out.mask[100:].any()
    # Few distinct values, heavy ties across the threshold; -0 and +0 are one score.
    gen = torch.Generator().manual_seed(3)
    logits = torch.randint(-3, 3, (5000, 4), generator=gen).to(dtype) * 0.5
    logits[logits == 0] = -0.0
    logits[::7, 0] = 0.0
    _check_frs(logits.to(device), 0.37)
    # Saturated sigmoid scores still ranked by logit.
    high = torch.tensor([[30.0], [40.0], [35.0], [-200.0]], dtype=dtype, device=device)
    assert _check_frs(high, 0.5).mask.tolist() == [False, True, True, False]


def test_frs_topk_mask_is_deterministic_across_thread_counts():
    logits = torch.randn(100_000, 4, generator=torch.Generator().manual_seed(0))
    first = ops.frs_topk_mask(logits, ratio=0.01)
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            again = ops.frs_topk_mask(logits, ratio=0.01)
            assert torch.equal(first.mask, again.mask) and torch.equal(first.fg, again.fg)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_frs_topk_mask_k_rounds_to_zero(dtype):
    logits = torch.randn(99, 3, dtype=dtype)
    for fn in (ops.frs_topk_mask, ops.frs_topk_mask_reference):
        out = fn(logits, ratio=0.01)  # int(0.99) = 0
        assert not out.mask.any() and out.fg.item() == 0.0 and out.fg.dtype == dtype


def test_frs_qfl_matches_formula():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(60, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(60, 6, generator=gen, dtype=torch.float64)
    out = ops.frs_qfl(s, t, ratio=0.05)
    region = ops.frs_topk_mask_reference(t, ratio=0.05)
    p_s, p_t = torch.sigmoid(s), torch.sigmoid(t)
    bce_neg = -torch.log(1 - p_s) * p_s**2  # BCE(p_s, 0) * p_s^2
    bce_pos = -(p_t * torch.log(p_s) + (1 - p_t) * torch.log(1 - p_s)) * (p_t - p_s) ** 2
    rows = region.mask.unsqueeze(1)
    expected = torch.where(rows, bce_pos, bce_neg).sum() / region.fg
    torch.testing.assert_close(out.loss, expected)
    assert torch.equal(out.mask, region.mask)
    assert torch.autograd.gradcheck(lambda x: ops.frs_qfl(x, t, ratio=0.05).loss, (s,))


def test_frs_qfl_empty_region_is_zero_and_connected():
    s = torch.randn(50, 3, requires_grad=True)
    out = ops.frs_qfl(s, torch.randn(50, 3), ratio=0.01)  # k = 0
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


# --------------------------------------------------------------------------------------------------------
# The registered ops: schema, fake tensors, autograd registration
# --------------------------------------------------------------------------------------------------------


@needs_ext
def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 9, generator=gen), torch.randn(16, 9, generator=gen)
    for mode in ("sigmoid", "softmax"):
        torch.library.opcheck(torch.ops.ssod_ops.ghm_kl, (s.clone().requires_grad_(), t, mode, 10))
        _, counts = torch.ops.ssod_ops.ghm_kl(s, t, mode, 10)
        torch.library.opcheck(torch.ops.ssod_ops.ghm_kl_backward, (torch.tensor(1.0), s, t, counts, mode, 10))
    boxes = _random_boxes(5, torch.float32, gen)
    torch.library.opcheck(torch.ops.ssod_ops.jitter_apply, (boxes, torch.randn(3, 5, 4, generator=gen), 0.06))
    torch.library.opcheck(
        torch.ops.ssod_ops.refine_stats,
        (torch.randn(3, 5, 2, 4, generator=gen), boxes.expand(3, 5, 4).contiguous(), torch.tensor([0, 1, 1, 0, 1]),
         [10.0, 10.0, 5.0, 5.0], math.log(1000 / 16)),
    )
    torch.library.opcheck(torch.ops.ssod_ops.frs_topk_mask, (s, 4))


@needs_ext
def test_opcheck_ghm_kl_forward_and_weight():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 9, generator=gen), torch.randn(16, 9, generator=gen)
    for mode in ("sigmoid", "softmax"):
        torch.library.opcheck(torch.ops.ssod_ops.ghm_kl_forward, (s, t, mode, 10))  # not differentiable itself
        _, counts, dkl, sample_bins = torch.ops.ssod_ops.ghm_kl_forward(s, t, mode, 10)
        torch.library.opcheck(
            torch.ops.ssod_ops.ghm_kl_weight_, (dkl, sample_bins, torch.tensor(1.0), counts, mode, 10)
        )


# --------------------------------------------------------------------------------------------------------
# CUDA against CPU (skipped without a GPU and a CUDA build)
# --------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and a CUDA build of semi._C")


@needs_cuda
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_cuda_ghm_kl_matches_cpu(mode):
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(3000, 80, generator=gen), torch.randn(3000, 80, generator=gen)
    cpu = ops.ghm_kl_with_counts(s, t, mode=mode)
    gpu = ops.ghm_kl_with_counts(s.cuda(), t.cuda(), mode=mode)
    assert torch.equal(cpu.counts, gpu.counts.cpu())
    torch.testing.assert_close(cpu.loss, gpu.loss.cpu(), rtol=1e-5, atol=1e-7)
    again = ops.ghm_kl_with_counts(s.cuda(), t.cuda(), mode=mode)
    assert torch.equal(again.loss, gpu.loss)  # deterministic


@needs_cuda
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_cuda_ghm_kl_gradient_matches_cpu(mode):
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(3000, 80, generator=gen), torch.randn(3000, 80, generator=gen)
    grads = []
    for device in ("cpu", "cuda"):
        x = s.to(device).requires_grad_()
        loss = ops.ghm_kl(x, t.to(device), mode=mode)
        loss.backward(retain_graph=True)
        first = x.grad.clone()
        loss.backward()  # the second backward recomputes the gradient
        assert torch.equal(x.grad, first + first)
        grads.append(first.cpu())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-9)


@needs_cuda
def test_cuda_frs_topk_mask_matches_cpu():
    logits = torch.randint(-50, 50, (200_000, 8), generator=torch.Generator().manual_seed(0)).float() / 10
    cpu = ops.frs_topk_mask(logits, ratio=0.01)
    gpu = ops.frs_topk_mask(logits.cuda(), ratio=0.01)
    assert torch.equal(cpu.mask, gpu.mask.cpu())
    torch.testing.assert_close(cpu.fg, gpu.fg.cpu())
