"""CPU decoding: float32 products in numpy's BLAS against F.linear, and one thread pool at a time."""

from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanoplay.cpu_decode import BlasLinear, decode_threads, use_decode_layout, uses_blas
from nanoplay.engine import Engine
from nanoplay.loading import LoadedModel
from nanoplay.sampling import SamplingParams
from tests.conftest import tiny_model


def blas_copy(linear: torch.nn.Linear) -> BlasLinear:
    linear.weight = torch.nn.Parameter(linear.weight.detach().t().contiguous().t(), requires_grad=False)
    return BlasLinear(linear)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 24), (4, 24), (2, 3, 24)])
def test_blas_linear_matches_f_linear(bias, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40, bias=bias)
    x = torch.randn(shape)
    reference = F.linear(x.double(), linear.weight.double(), None if linear.bias is None else linear.bias.double())
    layer = blas_copy(linear)
    with mock.patch("nanoplay.cpu_decode.np.matmul", wraps=np.matmul) as matmul, torch.inference_mode():
        y = layer(x)
    assert matmul.call_count == 1  # the product ran in numpy's BLAS
    assert y.shape == (*shape[:-1], 40) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference, atol=1e-5, rtol=1e-5)


def test_blas_linear_follows_its_parameters_changed_in_place_or_replaced():
    """It keeps numpy views of its weight and bias: a change in place shows through them (load_state_dict
    copies into the parameters), and a parameter given new memory gets new views."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 4)
    layer = blas_copy(linear)
    x = torch.randn(2, 6)

    def reference():
        return F.linear(x.double(), layer.weight.double(), layer.bias.double()).float()

    with torch.no_grad():
        layer(x)
        layer.weight.mul_(2)  # in place, as load_state_dict does
        layer.bias.add_(1)
        torch.testing.assert_close(layer(x), reference())
        layer.weight = torch.nn.Parameter(torch.randn(4, 6), requires_grad=False)  # new memory, (out, in) layout
        layer.bias.data = torch.zeros(4)
        torch.testing.assert_close(layer(x), reference())


def test_blas_linear_leaves_other_dtypes_and_gradients_to_torch():
    torch.manual_seed(0)
    layer = blas_copy(torch.nn.Linear(8, 5))
    x = torch.randn(3, 8, requires_grad=True)
    with mock.patch("nanoplay.cpu_decode.np.matmul", wraps=np.matmul) as matmul:
        layer(x).sum().backward()  # autograd needs torch's product
        with torch.no_grad():
            y16 = BlasLinear(torch.nn.Linear(8, 5).to(torch.bfloat16))(x.detach().to(torch.bfloat16))
    assert matmul.call_count == 0 and y16.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad, layer.weight.detach().sum(0).expand(3, 8))


def test_decode_layout_uses_blas_for_float32_only():
    model = tiny_model()
    use_decode_layout(model, compiled=False)
    assert uses_blas(model) and model.lm_head.weight is model.transformer.wte.weight  # still tied
    half = tiny_model().to(torch.bfloat16)
    use_decode_layout(half, compiled=False)
    w = half.transformer.h[0].mlp.c_fc.weight
    assert not uses_blas(half) and w.is_contiguous()  # nn.Linear's own layout: torch's bf16 kernels read it best


def test_a_model_the_compiled_step_decodes_keeps_torchs_products():
    """No BLAS beside the compiled step: OpenBLAS's threads spin after each product (a prefill's) on the
    cores the step's OpenMP threads need, which halved the speed of the ~20 steps after every prompt."""
    model = tiny_model()
    use_decode_layout(model, compiled=True)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert not uses_blas(model) and not any(isinstance(m, BlasLinear) for m in model.modules())
    assert len(linears) == 4 * model.config.n_layer + 1 and all(m.weight.is_contiguous() for m in linears)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied


def test_engine_steps_with_one_torch_thread_and_the_blas_threads_torch_had():
    """While a BLAS model steps torch has one thread and BLAS the caller's count (two spinning pools on the
    same cores ran 7x slower), and the caller's setting comes back after every step."""
    from threadpoolctl import threadpool_info

    model = tiny_model()
    use_decode_layout(model, compiled=False)
    loaded = LoadedModel(name="tiny", model=model, source="test", location="memory")
    seen = []
    forward = BlasLinear.forward

    def spy(self, x):
        seen.append((torch.get_num_threads(), [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]))
        return forward(self, x)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with mock.patch.object(BlasLinear, "forward", spy):
            req = Engine().generate(loaded, "Hello", SamplingParams(max_new_tokens=3, temperature=0))
        assert len(req.tokens) == 3 and seen
        assert all(torch_threads == 1 and blas == [2] * len(blas) and blas for torch_threads, blas in seen)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_decode_threads_nests_and_restores_torch_threads_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), decode_threads():
        with decode_threads():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1  # the outer one still runs
        raise RuntimeError("a failing step")
    assert torch.get_num_threads() == before


def test_decode_threads_from_two_threads_at_once_restore_the_callers_setting():
    """torch's thread count is partly one setting for the process: a thread that has not computed yet takes
    the last count any thread set. A worker that starts scoring while the engine's thread steps must not
    leave 1 behind for the threads that start later, nor give BLAS one thread."""
    import threading

    from threadpoolctl import threadpool_info

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    a_inside, b_inside, a_left = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with decode_threads():
            a_inside.set()
            b_inside.wait(5)
        a_left.set()

    def b():  # starts while a is inside
        with decode_threads():
            b_inside.set()
            a_left.wait(5)
            seen["b inside, after a left"] = torch.get_num_threads()

    def c():  # starts after both left
        seen["a later thread"] = torch.get_num_threads()

    try:
        first = threading.Thread(target=a)
        first.start()
        assert a_inside.wait(5)
        second = threading.Thread(target=b)
        second.start()
        first.join(), second.join()
        later = threading.Thread(target=c)
        later.start(), later.join()
        assert seen == {"b inside, after a left": 1, "a later thread": 2}
        assert {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas" and "numpy" in p["filepath"]} == {2}
    finally:
        torch.set_num_threads(before)


def test_blas_linear_overflows_to_inf_as_f_linear_does_and_says_nothing(recwarn):
    """A product past float32's range is inf in both (the sampler reports it); numpy would warn on stderr."""
    linear = torch.nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight.fill_(3e38)
        linear.bias.fill_(-3e38)
    x = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, -1.0, 0.0, 0.0]])
    reference = F.linear(x, linear.weight, linear.bias)
    with torch.inference_mode():
        y = blas_copy(linear)(x)
    assert torch.equal(y, reference) and torch.isinf(y[0]).all()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
