"""The device-strict mode (attnchain.testing.strict_cuda) follows CUDA's rules on the CPU.

Each rule is checked on what a Colab GPU runtime does: conversion of a device tensor to NumPy
fails (directly and through pandas, matplotlib and scikit-learn), mixing a device tensor with a
CPU tensor of one or more dimensions fails, a CPU generator cannot draw on the device, and models
moved with ``.to("cuda")`` compute on device tensors. The mode must also stay out of the way of
correct code: same values as on the CPU, in-place methods, indexing with CPU indices, ``.cpu()``.
"""
import gc

import numpy as np
import pytest
import torch

from attnchain.testing import strict_cuda

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def strict():
    strict_cuda.enable()
    try:
        yield
    finally:
        strict_cuda.disable()


def test_factories_and_moves_give_device_tensors(strict):
    x = torch.randn(3, 4, device="cuda")
    assert x.device == torch.device("cuda", 0) and x.is_cuda
    assert torch.zeros(2, device=x.device).device.type == "cuda"
    assert torch.ones(2).to("cuda").device.type == "cuda"
    assert torch.ones(2).cuda().device.type == "cuda"
    assert torch.ones(2).to(x).device.type == "cuda"
    assert (x @ x.T).device.type == "cuda"
    assert x.new_zeros(3).device.type == "cuda"
    assert x.to(torch.float64).device.type == "cuda"
    back = x.cpu()
    assert type(back) is torch.Tensor and back.device.type == "cpu"
    assert type(x.to("cpu")) is torch.Tensor


def test_numpy_conversion_fails_everywhere_numpy_is_reached(strict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    x = torch.rand(5, device="cuda")
    for convert in (lambda: x.numpy(), lambda: np.asarray(x), lambda: pd.Series(x),
                    lambda: plt.plot(x), lambda: roc_auc_score([0, 1, 0, 1, 1], x)):
        with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
            convert()
    plt.close("all")
    assert x.cpu().numpy().shape == (5,)  # the boundary: explicit .cpu()
    assert isinstance(x.tolist(), list) and isinstance(float(x[0]), float)


def test_mixing_devices_fails_like_cuda(strict):
    x = torch.rand(3, 3, device="cuda")
    for op in (lambda: x + torch.ones(3, 3), lambda: torch.cat([x, torch.ones(1, 3)]),
               lambda: torch.where(torch.ones(3, 3, dtype=torch.bool), x, x),
               lambda: x.index_select(0, torch.tensor([0]))):
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            op()
    # what CUDA allows: 0-dim CPU tensors as scalars, CPU indices, CPU values in __setitem__
    assert (x * torch.tensor(2.0)).device.type == "cuda"
    assert x[torch.tensor([0, 2])].shape == (2, 3)
    x[0] = torch.zeros(3)
    assert float(x[0].sum()) == 0.0


def test_cpu_generator_on_device_fails(strict):
    g = torch.Generator().manual_seed(0)
    with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator"):
        torch.randn(3, generator=g, device="cuda")


def test_values_are_those_of_the_cpu(strict):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g)
    ref = torch.linalg.inv(a) @ a.softmax(-1)
    got = torch.linalg.inv(a.cuda()) @ a.cuda().softmax(-1)
    assert torch.equal(got.cpu(), ref)


def test_in_place_methods_return_the_same_tensor(strict):
    x = torch.zeros(3, device="cuda")
    assert x.add_(1) is x and float(x.sum()) == 3.0


def test_models_move_and_compute_on_the_device(strict):
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).cuda()
    w = next(m.parameters())
    assert isinstance(w, torch.nn.Parameter) and w.device.type == "cuda"
    assert m(torch.ones(1, 4, device="cuda")).device.type == "cuda"
    with pytest.raises(RuntimeError, match="same device"):
        m(torch.ones(1, 4))  # a CPU input to a GPU model


def test_device_memory_is_counted(strict):
    strict_cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    x = torch.empty(1024, 256, device="cuda")  # 1 MiB
    view = x[:10]
    assert torch.cuda.memory_allocated() - base == 2 ** 20  # views share the storage
    del x, view
    gc.collect()
    assert torch.cuda.memory_allocated() == base
    assert torch.cuda.max_memory_allocated() - base >= 2 ** 20


def test_simulated_gpu_is_reported(strict):
    assert torch.cuda.is_available()
    assert torch.cuda.get_device_properties(0).total_memory == strict_cuda.GPUS["T4"].total_memory


def test_disable_restores_torch():
    strict_cuda.enable()
    strict_cuda.disable()
    assert not torch.cuda.is_available()
    assert type(torch.ones(2) + 1) is torch.Tensor
    with pytest.raises(ValueError, match="gpu must be one of"):
        strict_cuda.enable("V100")


def test_capture_and_markov_core_run_on_the_device(strict):
    import attnchain as ac

    model, preprocess = ac.zoo.load("tiny-timm-vit")
    assert next(model.parameters()).device.type == "cuda"  # the zoo picks the (simulated) GPU
    with torch.no_grad(), ac.capture(model) as rec:
        model(preprocess(torch.rand(2, 3, 32, 32)))
    A = rec.attentions["blocks.1.attn"]
    assert A.device.type == "cuda"
    for out in (ac.token_rank(A), ac.lambda2(A), ac.bounce(A, 0, 2), ac.head_mean(A, "lambda2")):
        assert out.device.type == "cuda"
