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


def test_cuda_cases_run_when_expected():
    # SSOD_EXPECT_CUDA=1 (.ci/gpu_check): the CUDA cases below must run, not be skipped.
    if os.environ.get("SSOD_EXPECT_CUDA") != "1":
        pytest.skip("SSOD_EXPECT_CUDA is not set")
    assert torch.cuda.is_available(), "SSOD_EXPECT_CUDA=1 but torch sees no GPU"
    assert ops.extension_compiled_with_cuda(), f"semi._C has no CUDA kernels ({ops.extension_error()})"
    assert "cuda" in DEVICES


# --------------------------------------------------------------------------------------------------------
# ghm_kl
# --------------------------------------------------------------------------------------------------------


def assert_ghm_kl_matches_reference(s, t, *, mode, bins=10, loss_atol=1e-7, grad_atol=1e-12):
    """Kernel against reference on logits s, t: equal counts, close loss, close gradient w.r.t. s."""
    x, x_ref = s.clone().requires_grad_(), s.clone().requires_grad_()
    out = ops.ghm_kl_with_counts(x, t, mode=mode, bins=bins)
    ref = ops.ghm_kl_reference(x_ref, t, mode=mode, bins=bins)
    assert torch.equal(out.counts, ref.counts)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=loss_atol)
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=grad_atol)


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
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bins", [1, 3, 17, 33, 50])
def test_ghm_kl_bins_forward_and_backward(device, bins):
    # The CPU kernel takes different paths by the number of bins (bin sums by vector compares up to 32 bins,
    # scattered beyond; the backward's weights by a lane-wise table lookup up to 32 bins, gathered beyond),
    # and the vector loops run on whole vectors with a scalar remainder: 5000 elements exercise both. The
    # CUDA kernel takes one pass per 16 bins.
    gen = torch.Generator().manual_seed(bins)
    s, t = torch.randn(1000, 5, generator=gen) * 3, torch.randn(1000, 5, generator=gen) * 3
    s, t = s.to(device), t.to(device)
    s_kernel, s_ref = s.clone().requires_grad_(), s.clone().requires_grad_()
    out = ops.ghm_kl_with_counts(s_kernel, t, mode="sigmoid", bins=bins)
    ref = ops.ghm_kl_reference(s_ref, t, mode="sigmoid", bins=bins)
    assert torch.equal(out.counts, ref.counts)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-7)
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(s_kernel.grad, s_ref.grad, rtol=1e-5, atol=1e-9)


def _sigmoid_logits_off_the_bin_edges(n: int, bins: int, gen: torch.Generator, device: str):
    """(n,) student and teacher logits whose g = |p_s - p_t| lie at the centres of random bins, so that no
    rounding moves an element across a bin edge (among millions of random pairs, some would be within an ulp
    of one, and the kernel and the reference could then count it in neighbouring bins)."""
    top = int((1 - 4e-3) * bins - 0.5) + 1  # bins whose centre leaves room for both probabilities in (0, 1)
    g = (torch.randint(0, top, (n,), generator=gen, device=device, dtype=torch.float64) + 0.5) / bins
    low = 1e-3 + torch.rand(n, generator=gen, device=device, dtype=torch.float64) * (1 - g - 2e-3)
    swap = torch.rand(n, generator=gen, device=device) < 0.5
    p_s, p_t = torch.where(swap, low + g, low), torch.where(swap, low, low + g)
    return torch.logit(p_s).float(), torch.logit(p_t).float()


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bins", [300, 5000])
def test_ghm_kl_many_bins(device, bins):
    # Hundreds of bins: 19 passes of 16 bins on CUDA; thousands: fewer blocks there, so that the per-block
    # partials stay small. (With bins 2e-4 wide, random logits would put elements within an ulp of an edge.)
    gen = torch.Generator(device=device).manual_seed(bins)
    s, t = (x.reshape(1000, 5) for x in _sigmoid_logits_off_the_bin_edges(5000, bins, gen, device))
    s_kernel, s_ref = s.clone().requires_grad_(), s.clone().requires_grad_()
    out = ops.ghm_kl_with_counts(s_kernel, t, mode="sigmoid", bins=bins)
    ref = ops.ghm_kl_reference(s_ref, t, mode="sigmoid", bins=bins)
    assert torch.equal(out.counts, ref.counts) and int((out.counts > 0).sum()) > bins // 2
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-7)
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(s_kernel.grad, s_ref.grad, rtol=1e-5, atol=1e-9)


def check_softmax_rows(rows: int, classes: int, dtype: torch.dtype, device: str = "cpu") -> None:
    """Softmax ghm_kl on (rows, classes) logits against the reference: counts, loss and gradient."""
    gen = torch.Generator().manual_seed(classes)
    s = (torch.randn(rows, classes, generator=gen, dtype=dtype) * 3).to(device)
    t = (torch.randn(rows, classes, generator=gen, dtype=dtype) * 3).to(device)
    s_kernel, s_ref = s.clone().requires_grad_(), s.clone().requires_grad_()
    out = ops.ghm_kl_with_counts(s_kernel, t, mode="softmax", bins=10)
    ref = ops.ghm_kl_reference(s_ref, t, mode="softmax", bins=10)
    assert torch.equal(out.counts, ref.counts)
    torch.testing.assert_close(out.loss, ref.loss, **tolerances(dtype))
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(s_kernel.grad, s_ref.grad, **tolerances(dtype))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [2, 8, 15, 16, 17, 32, 80, 81, 1500])
def test_ghm_kl_softmax_row_widths(device, dtype, classes):
    # The CPU kernel reads a row as vectors of up to 16 classes, the last one overlapping the one before (or
    # padded, for rows shorter than a vector); rows wider than 1024 classes go one class at a time.
    check_softmax_rows(67, classes, dtype, device)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bins", [10, 64])  # the vector-compare and the scatter accumulations
def test_ghm_kl_nan_logits_fall_in_the_first_bin(device, mode, dtype, bins):
    # A diverged student: NaN logits in the vector loops and in the scalar remainder. Each NaN sample (an
    # element, or a row holding a NaN) is counted in bin 0 and makes the loss NaN, in kernel and reference.
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(37, 41, generator=gen, dtype=dtype)
    t = torch.randn(37, 41, generator=gen, dtype=dtype)
    s[0, :8] = float("nan")
    s[5, 40] = float("nan")
    s[36, 39] = float("nan")
    s, t = s.to(device), t.to(device)
    out = ops.ghm_kl_with_counts(s, t, mode=mode, bins=bins)
    ref = ops.ghm_kl_reference(s, t, mode=mode, bins=bins)
    assert torch.isnan(out.loss) and torch.isnan(ref.loss)
    assert torch.equal(out.counts.cpu(), ref.counts.cpu())
    samples = s.numel() if mode == "sigmoid" else s.shape[0]
    nan_samples = 10 if mode == "sigmoid" else 3
    assert int(out.counts.sum()) == samples and int(out.counts[0]) >= nan_samples


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ghm_kl_extreme_logits_are_finite(device, mode, dtype):
    s = torch.tensor([[100.0, -100.0, 0.0, 100.0], [-100.0, 100.0, 50.0, -50.0]], dtype=dtype, device=device,
                     requires_grad=True)
    t = torch.tensor([[-100.0, 100.0, 0.0, 100.0], [100.0, -100.0, -50.0, 50.0]], dtype=dtype, device=device)
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
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_ghm_kl_gradcheck(device, mode):
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(6, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    t = torch.randn(6, 5, generator=gen, dtype=torch.float64).to(device)
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



@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_take_float32_and_float64_only(device, dtype):
    # The kernels refuse 16-bit tensors with an error naming the op and the argument; the Python entry points
    # run in float32 (detectors.precision.in_float32), so that under autocast the kernels never see them.
    name = {torch.float16: "Half", torch.bfloat16: "BFloat16"}[dtype]
    x = torch.randn(8, 3, device=device).to(dtype)
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0]], device=device).to(dtype)
    calls = {
        "ghm_kl: student": lambda: torch.ops.ssod_ops.ghm_kl(x, x, "sigmoid", 10),
        "ghm_kl_forward: student": lambda: torch.ops.ssod_ops.ghm_kl_forward(x, x, "softmax", 10),
        "frs_topk_mask: logits": lambda: torch.ops.ssod_ops.frs_topk_mask(x, 2),
        "jitter_apply: boxes": lambda: torch.ops.ssod_ops.jitter_apply(boxes, boxes.expand(2, 1, 4), 0.1),
        "refine_stats: boxes": lambda: torch.ops.ssod_ops.refine_stats(
            boxes.reshape(1, 1, 1, 4).expand(2, 1, 1, 4).contiguous(), boxes.expand(2, 1, 4).contiguous(),
            torch.zeros(1, dtype=torch.int64, device=device), [10.0, 10.0, 5.0, 5.0], 4.0),
    }
    for what, call in calls.items():
        with pytest.raises(RuntimeError, match=f"ssod_ops.{what} must be float32 or float64, got {name}"):
            call()
    student = x.float().requires_grad_()
    low = student.detach().to(dtype).requires_grad_()
    out, ref = ops.ghm_kl(low, x, mode="sigmoid"), ops.ghm_kl(student.detach().to(dtype).float(), x.float(),
                                                                mode="sigmoid")
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    out.backward()
    assert low.grad.dtype == dtype and torch.isfinite(low.grad.float()).all()
    assert ops.frs_topk_mask(x, ratio=0.5).fg.dtype == torch.float32
    assert ops.jitter_boxes(boxes, times=2, scale=0.1).dtype == torch.float32


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_kernels_give_the_same_bits_on_every_run(device):
    # No float atomics anywhere: every sum runs in an order fixed by the problem size.
    gen = torch.Generator().manual_seed(11)
    s, t = (torch.randn(5000, 80, generator=gen) * 3).to(device), (torch.randn(5000, 80, generator=gen) * 3).to(device)
    boxes = _random_boxes(3000, torch.float32, gen).to(device)
    deltas = torch.randn(10, 3000, 5, 4, generator=gen).to(device)
    labels = torch.randint(0, 5, (3000,), generator=gen).to(device)

    def run():
        results = []
        for mode in ("sigmoid", "softmax"):
            x = s.clone().requires_grad_()
            out = ops.ghm_kl_with_counts(x, t, mode=mode, bins=10)
            out.loss.backward()
            results += [out.loss, out.counts, x.grad]
        results += list(ops.frs_topk_mask(s, ratio=0.01))
        jittered = ops.jitter_boxes(boxes, times=10, scale=0.06, generator=torch.Generator(device).manual_seed(1))
        results += [jittered, *ops.refine_stats(deltas, jittered, labels)]
        return results

    first = run()
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(first, run()))


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
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (37, 13), (67, 81), (301, 7)])
def test_ghm_kl_forward_keeps_the_gradient(device, dtype, mode, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    s = (torch.randn(shape, generator=gen, dtype=dtype) * 3).to(device)
    t = (torch.randn(shape, generator=gen, dtype=dtype) * 3).to(device)
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
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("bins", [1, 10, 33, 50])
@pytest.mark.parametrize("shape", [(1, 1), (37, 13), (67, 81), (1000, 5), (20, 300)])
def test_ghm_kl_weight_equals_the_recomputed_backward(device, dtype, mode, bins, shape):
    # The in-place weighting of the forward's dkl and the backward that recomputes it from the logits give
    # the same numbers, bit for bit (bins up to 32 take a table lookup on the CPU, more a gather).
    gen = torch.Generator().manual_seed(bins + sum(shape))
    s = (torch.randn(shape, generator=gen, dtype=dtype) * 3).to(device)
    t = (torch.randn(shape, generator=gen, dtype=dtype) * 3).to(device)
    grad = torch.tensor(0.37, dtype=dtype, device=device)
    _, counts, dkl, sample_bins = torch.ops.ssod_ops.ghm_kl_forward(s, t, mode, bins)
    recomputed = torch.ops.ssod_ops.ghm_kl_backward(grad, s, t, counts, mode, bins)
    torch.ops.ssod_ops.ghm_kl_weight_(dkl, sample_bins, grad, counts, mode, bins)
    assert torch.equal(dkl, recomputed)
    s_ref = s.clone().requires_grad_()
    (grad * ops.ghm_kl_reference(s_ref, t, mode=mode, bins=bins).loss).backward()
    torch.testing.assert_close(dkl, s_ref.grad, **tolerances(dtype))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_ghm_kl_backward_twice_with_retain_graph(device, mode):
    # The first backward hands the forward's buffer over as the gradient; a second backward of the same
    # graph recomputes it, with the same result.
    gen = torch.Generator().manual_seed(3)
    s = (torch.randn(300, 81, generator=gen) * 3).to(device).requires_grad_()
    t = (torch.randn(300, 81, generator=gen) * 3).to(device)
    loss = 2.5 * ops.ghm_kl(s, t, mode=mode)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward()
    assert torch.equal(s.grad, first + first)
    s_ref = s.detach().clone().requires_grad_()
    (2.5 * ops.ghm_kl_reference(s_ref, t, mode=mode, bins=10).loss).backward()
    torch.testing.assert_close(first, s_ref.grad, rtol=1e-5, atol=1e-9)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_ghm_kl_without_grad_gives_the_same_loss(device, mode):
    gen = torch.Generator().manual_seed(4)
    s, t = torch.randn(500, 81, generator=gen).to(device), torch.randn(500, 81, generator=gen).to(device)
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
    assert_ghm_kl_matches_reference(s, t, mode="sigmoid")


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


@pytest.mark.parametrize("device", DEVICES)
def test_refine_stats_bad_input(device):
    boxes = torch.zeros(10, 3, 4, device=device)
    with pytest.raises(ValueError, match="times >= 2"):
        ops.refine_stats(torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 4), torch.zeros(3, dtype=torch.int64))
    # On CUDA too: the kernel cannot raise there, and would give those boxes NaN.
    for labels in ([0, 1, 2], [0, -1, 1]):
        with pytest.raises(ValueError, match="labels must lie"):
            ops.refine_stats(torch.zeros(30, 2, 4, device=device), boxes, torch.tensor(labels, device=device))
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_frs_topk_mask_k_rounds_to_zero(device, dtype):
    logits = torch.randn(99, 3, dtype=dtype, device=device)
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
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 9, generator=gen).to(device), torch.randn(16, 9, generator=gen).to(device)
    one = torch.tensor(1.0, device=device)
    for mode in ("sigmoid", "softmax"):
        torch.library.opcheck(torch.ops.ssod_ops.ghm_kl, (s.clone().requires_grad_(), t, mode, 10))
        _, counts = torch.ops.ssod_ops.ghm_kl(s, t, mode, 10)
        torch.library.opcheck(torch.ops.ssod_ops.ghm_kl_backward, (one, s, t, counts, mode, 10))
    boxes = _random_boxes(5, torch.float32, gen).to(device)
    noise = torch.randn(3, 5, 4, generator=gen).to(device)
    torch.library.opcheck(torch.ops.ssod_ops.jitter_apply, (boxes, noise, 0.06))
    deltas = torch.randn(3, 5, 2, 4, generator=gen).to(device)
    labels = torch.tensor([0, 1, 1, 0, 1], device=device)
    torch.library.opcheck(
        torch.ops.ssod_ops.refine_stats,
        (deltas, boxes.expand(3, 5, 4).contiguous(), labels, [10.0, 10.0, 5.0, 5.0], math.log(1000 / 16)),
    )
    torch.library.opcheck(torch.ops.ssod_ops.frs_topk_mask, (s, 4))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_ghm_kl_forward_and_weight(device):
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 9, generator=gen).to(device), torch.randn(16, 9, generator=gen).to(device)
    for mode in ("sigmoid", "softmax"):
        torch.library.opcheck(torch.ops.ssod_ops.ghm_kl_forward, (s, t, mode, 10))  # not differentiable itself
        _, counts, dkl, sample_bins = torch.ops.ssod_ops.ghm_kl_forward(s, t, mode, 10)
        torch.library.opcheck(
            torch.ops.ssod_ops.ghm_kl_weight_,
            (dkl, sample_bins, torch.tensor(1.0, device=device), counts, mode, 10),
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


@needs_cuda
def test_cuda_kernels_run_on_the_current_stream():
    # Inputs made on a side stream and used there at once: a kernel launched on another stream would race
    # the work that writes them (the big matmul keeps the side stream busy while the op is queued).
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(4096, 4096, generator=gen).cuda()
    base = torch.randn(50_000, 80, generator=gen).cuda()
    boxes = _random_boxes(2000, torch.float32, gen).cuda()
    deltas, labels = torch.randn(10, 2000, 5, 4, generator=gen).cuda(), torch.randint(0, 5, (2000,)).cuda()
    noise = torch.randn(10, 2000, 4, generator=gen).cuda()

    def compute():
        logits = (a @ a)[:1, :1] * 0 + base  # waits for the matmul, on the stream it is queued on
        x = logits.clone().requires_grad_()
        loss, counts = torch.ops.ssod_ops.ghm_kl(x, logits, "sigmoid", 10)
        loss.backward()
        mask, fg = torch.ops.ssod_ops.frs_topk_mask(logits, 500)
        jittered = torch.ops.ssod_ops.jitter_apply(boxes + logits[0, 0] * 0, noise, 0.06)
        mean, uncertainty = torch.ops.ssod_ops.refine_stats(deltas, jittered, labels, [10.0, 10.0, 5.0, 5.0], 4.0)
        return [loss, counts, x.grad, mask, fg, jittered, mean, uncertainty]

    expected = [r.clone() for r in compute()]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = compute()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


@pytest.mark.skipif("cuda" not in DEVICES or torch.cuda.device_count() < 2, reason="needs two GPUs and a CUDA build")
def test_cuda_kernels_follow_their_inputs_to_another_gpu():
    # Current device 0, inputs on device 1: the kernels must launch on (and allocate on) device 1.
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(3000, 80, generator=gen), torch.randn(3000, 80, generator=gen)
    boxes, noise = _random_boxes(100, torch.float32, gen), torch.randn(10, 100, 4, generator=gen)
    deltas, labels = torch.randn(10, 100, 5, 4, generator=gen), torch.randint(0, 5, (100,), generator=gen)
    results = {}
    for device in ("cuda:0", "cuda:1"):
        with torch.cuda.device(0):
            x = s.to(device).requires_grad_()
            out = ops.ghm_kl_with_counts(x, t.to(device), mode="softmax")
            out.loss.backward()
            region = ops.frs_topk_mask(s.to(device), ratio=0.01)
            jittered = torch.ops.ssod_ops.jitter_apply(boxes.to(device), noise.to(device), 0.06)
            refined = ops.refine_stats(deltas.to(device), jittered, labels.to(device))
            outputs = [out.loss, out.counts, x.grad, *region, jittered, *refined]
            assert all(o.device == torch.device(device) for o in outputs)
            results[device] = [o.cpu() for o in outputs]
    assert all(torch.equal(a, b) for a, b in zip(results["cuda:0"], results["cuda:1"]))
    with pytest.raises(RuntimeError, match="jitter_apply: boxes and noise must be on the same device"):
        torch.ops.ssod_ops.jitter_apply(boxes.to("cuda:0"), noise.to("cuda:1"), 0.06)
    with pytest.raises(RuntimeError, match="refine_stats: labels and boxes must be on the same device"):
        torch.ops.ssod_ops.refine_stats(deltas.to("cuda:1"), jittered, labels.to("cuda:0"), [1.0] * 4, 4.0)


@needs_cuda
def test_cuda_refine_stats_kernel_gives_nan_for_a_bad_label_and_the_gpu_stays_usable():
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0]] * 2] * 3, device="cuda")  # (T=3, N=2, 4)
    deltas = torch.zeros(3, 2, 4, 4, device="cuda")
    mean, uncertainty = torch.ops.ssod_ops.refine_stats(deltas, boxes, torch.tensor([1, 4], device="cuda"),
                                                        [10.0, 10.0, 5.0, 5.0], 4.0)
    assert mean[0].tolist() == [0.0, 0.0, 10.0, 10.0] and uncertainty[0].item() == 0.0
    assert mean[1].isnan().all() and uncertainty[1].isnan()
    assert torch.ones(3, device="cuda").sum().item() == 3.0  # no device-side assert poisoned the context


@needs_cuda
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_cuda_ghm_kl_at_coco_sizes(mode):
    # Sigmoid: RetinaNet's anchors of a COCO batch (350k x 80 = 28M elements: grids capped, loops strided);
    # softmax: the RoI head's 4096 sampled RoIs x 81.
    gen = torch.Generator(device="cuda").manual_seed(0)
    if mode == "sigmoid":
        s, t = (x.reshape(350_000, 80) for x in _sigmoid_logits_off_the_bin_edges(350_000 * 80, 10, gen, "cuda"))
    else:
        s = torch.randn(4096, 81, generator=gen, device="cuda") * 3
        t = torch.randn(4096, 81, generator=gen, device="cuda") * 3
    assert_ghm_kl_matches_reference(s, t, mode=mode)


@needs_cuda
def test_cuda_frs_topk_mask_and_jitter_refine_at_coco_sizes():
    # Dense Teacher's 350k locations x 80 classes of a COCO batch; Soft Teacher's boxes far beyond COCO's
    # (20M jittered coordinates: more than one pass of the capped grid).
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(350_000, 80, generator=gen, device="cuda") * 4
    _check_frs(logits, 0.01)
    n = 500_000
    boxes = _random_boxes(n, torch.float64, torch.Generator().manual_seed(1)).cuda()
    jittered = ops.jitter_boxes(boxes, times=10, scale=0.06, generator=torch.Generator("cuda").manual_seed(2))
    expected = ops.jitter_boxes_reference(boxes, times=10, scale=0.06, generator=torch.Generator("cuda").manual_seed(2))
    torch.testing.assert_close(jittered, expected, **tolerances(torch.float64))
    deltas = torch.randn(10, n, 2, 4, generator=gen, device="cuda", dtype=torch.float64)
    labels = torch.randint(0, 2, (n,), generator=gen, device="cuda")
    out, ref = ops.refine_stats(deltas, jittered, labels), ops.refine_stats_reference(deltas, jittered, labels)
    torch.testing.assert_close(out.mean_boxes, ref.mean_boxes, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.uncertainty, ref.uncertainty, rtol=1e-9, atol=1e-9)
