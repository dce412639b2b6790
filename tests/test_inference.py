"""The sliding-window inferer against MONAI's, and its recomputed gradient against full autograd."""

import itertools
import weakref

import pytest
import torch
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference
from torch import nn

from advseg.inference import SlidingWindow, gaussian_weights, window_starts
from advseg.inference.sliding import saved_bytes as graph_bytes


def tiny3d(classes: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """Conv 3x3x3 (4), instance norm, leaky ReLU, conv 3x3x3 (classes); eval, frozen."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.LeakyReLU(0.01),
        nn.Conv3d(4, classes, 3, padding=1),
    ).to(dtype).eval()  # fmt: skip
    return net.requires_grad_(False)


def monai(x, net, roi, overlap=0.5, mode="gaussian", batch=1, mirror=()):
    """MONAI's inferer, with nnU-Net's mirroring written out as its predictor."""
    flips = [tuple(a + 2 for a in c) for n in range(1, len(mirror) + 1)
             for c in itertools.combinations(mirror, n)]  # fmt: skip

    def predictor(w):
        out = net(w)
        for dims in flips:
            out = out + net(w.flip(dims)).flip(dims)
        return out / (len(flips) + 1)

    return sliding_window_inference(x, roi, batch, predictor, overlap=overlap, mode=mode)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_equals_monai_gaussian(overlap, batch):
    net = tiny3d()
    x = torch.rand(2, 1, 13, 17, 11, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = SlidingWindow(net, (8, 10, 6), overlap=overlap, batch_size=batch)(x)
        theirs = monai(x, net, (8, 10, 6), overlap, batch=batch)
    assert ours.shape == (2, 3, 13, 17, 11)
    assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("shape", "kw"),
    [
        ((1, 1, 5, 12, 7), {}),  # smaller than the window along two axes: padded, cropped back
        ((1, 1, 12, 12, 12), {"blend": "constant"}),
        ((1, 1, 12, 10, 9), {"mirror_axes": (0, 1, 2)}),
        ((1, 1, 12, 10, 9), {"mirror_axes": (2,), "sigma_scale": 0.25}),
    ],
)
def test_padding_constant_blend_and_mirroring_equal_monai(shape, kw):
    net = tiny3d()
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(2))
    mode = kw.get("blend", "gaussian")
    with torch.no_grad():
        ours = SlidingWindow(net, (8, 8, 8), **kw)(x)
        if "sigma_scale" in kw:
            theirs = sliding_window_inference(
                x, (8, 8, 8), 1, lambda w: (net(w) + net(w.flip(4)).flip(4)) / 2,
                sigma_scale=0.25, mode="gaussian",
            )  # fmt: skip
        else:
            theirs = monai(x, net, (8, 8, 8), mode=mode, mirror=kw.get("mirror_axes", ()))
    assert (ours - theirs).abs().max() <= 1e-5


def test_window_grid_and_weights_are_monais():
    for size, roi, overlap in [(13, 8, 0.5), (8, 8, 0.5), (40, 32, 0.0), (100, 32, 0.7)]:
        starts = window_starts(size, roi, overlap)
        assert starts[0] == 0 and starts[-1] == size - roi  # the grid covers the axis
        assert all(b > a for a, b in itertools.pairwise(starts))
    expected = compute_importance_map((8, 10, 6), mode="gaussian", sigma_scale=0.125)
    assert torch.equal(gaussian_weights((8, 10, 6)), expected)


@pytest.mark.parametrize("mirror", [(), (0, 2)])
def test_recomputed_gradient_equals_full_autograd_through_monai(mirror):
    """float64: advseg's window-by-window backward against autograd through MONAI's whole
    inference (every window's graph kept), for a random weighting of the logits."""
    net = tiny3d(dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 1, 13, 11, 10, generator=g, dtype=torch.float64)
    w = torch.randn(2, 3, 13, 11, 10, generator=g, dtype=torch.float64)
    ours = x.clone().requires_grad_(True)
    inferer = SlidingWindow(net, (8, 8, 8), mirror_axes=mirror, batch_size=2, memory="recompute")
    (inferer(ours) * w).sum().backward()
    theirs = x.clone().requires_grad_(True)
    (monai(theirs, net, (8, 8, 8), batch=2, mirror=mirror) * w).sum().backward()
    relative = (ours.grad - theirs.grad).norm() / theirs.grad.norm()
    assert relative <= 1e-6


def saved_bytes(inferer: SlidingWindow, x: torch.Tensor) -> int:
    """Bytes autograd saved for the backward during the inferer's forward and still holds after
    it (a graph built and dropped in the forward does not count), the model's weights aside."""
    weights = {p.untyped_storage().data_ptr() for p in inferer.model.parameters()}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved.append((weakref.ref(t), t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = inferer(x.requires_grad_(True))
    alive = sum(size for ref, size in saved if ref() is not None)
    del out
    return alive


def test_recompute_keeps_no_window_graph():
    """What autograd saves during the forward: the input alone with ``recompute`` and no graph
    kept; every window's activations with ``graph`` (MONAI's behaviour)."""
    net = tiny3d()
    x = torch.rand(1, 1, 16, 16, 16)
    assert saved_bytes(SlidingWindow(net, (8, 8, 8), memory="recompute", keep_graphs=0), x) == (
        x.numel() * x.element_size()
    )
    assert saved_bytes(SlidingWindow(net, (8, 8, 8), memory="graph"), x) > 20 * x.numel() * 4


@pytest.mark.parametrize("keep", [1, 2, 5])
def test_kept_graphs_are_bounded_by_keep_graphs_not_by_the_volume(keep):
    """keep_graphs=k saves k windows' graphs (whole batches), the same on 8, 27 and 125 windows:
    memory does not grow with the volume."""
    net = tiny3d()
    window = saved_bytes(SlidingWindow(net, (8, 8, 8), keep_graphs=1), torch.rand(1, 1, 8, 8, 8))
    window -= 8**3 * 4  # one window's graph: what a volume of one window saves beyond its input
    assert window > 10 * 8**3 * 4  # the activations of a window, not just its input
    for size in (12, 16, 24):  # 2, 3 and 5 windows per axis
        x = torch.rand(1, 1, size, size, size)
        inferer = SlidingWindow(net, (8, 8, 8), memory="recompute", keep_graphs=keep)
        assert saved_bytes(inferer, x) - x.numel() * 4 == keep * window
    x = torch.rand(1, 1, 12, 12, 12)  # 8 windows, in 4 batches of 2: whole batches are kept

    def batched(k: int) -> int:
        return saved_bytes(SlidingWindow(net, (8, 8, 8), batch_size=2, keep_graphs=k), x) - 1728 * 4

    pair = batched(2)
    assert 1.5 * window < pair <= 2 * window
    assert batched(keep) == keep // 2 * pair


def test_graph_memory_caps_the_kept_graphs_in_bytes():
    """graph_memory: a window's graph is kept while the kept bytes stay within it; the bytes
    counted are what autograd saved (the test's own hook agrees, the weights aside)."""
    net = tiny3d()
    w = torch.rand(1, 1, 8, 8, 8).requires_grad_(True)
    window = graph_bytes(net(w), net)
    one = SlidingWindow(net, (8, 8, 8), keep_graphs=1, graph_memory=None)
    assert saved_bytes(one, torch.rand(1, 1, 8, 8, 8)) - 8**3 * 4 == window
    x = torch.rand(1, 1, 16, 16, 16)
    for budget, kept in [(None, 5), (5.5 * window, 5), (2.5 * window, 2), (0.5 * window, 0)]:
        inferer = SlidingWindow(net, (8, 8, 8), keep_graphs=5, graph_memory=budget)
        assert saved_bytes(inferer, x) - x.numel() * 4 == kept * window, budget


@pytest.mark.parametrize(("batch", "mirror"), [(1, ()), (2, (0, 2))])
def test_kept_graphs_give_the_same_gradient(batch, mirror):
    """float64: the input gradient with no graph kept, some and every window's (10 windows of
    2 images) agree to 1e-12; a second backward (graphs used up) recomputes, same gradient."""
    net = tiny3d(dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 1, 13, 11, 10, generator=g, dtype=torch.float64)
    w = torch.randn(2, 3, 13, 11, 10, generator=g, dtype=torch.float64)
    grads = {}
    for keep, budget in [(0, None), (1, None), (3, None), (8, None), (100, None), (8, 1.2e5)]:
        ours = x.clone().requires_grad_(True)
        inferer = SlidingWindow(net, (8, 8, 8), batch_size=batch, mirror_axes=mirror,
                                keep_graphs=keep, graph_memory=budget)  # fmt: skip
        out = (inferer(ours) * w).sum()
        (grads[keep, budget],) = torch.autograd.grad(out, ours, retain_graph=True)
        (again,) = torch.autograd.grad(out, ours)
        assert (again - grads[keep, budget]).abs().max() <= 1e-12
    for keep, grad in grads.items():
        assert (grad - grads[0, None]).abs().max() <= 1e-12 * grads[0, None].abs().max(), keep
    theirs = x.clone().requires_grad_(True)
    (monai(theirs, net, (8, 8, 8), batch=batch, mirror=mirror) * w).sum().backward()
    assert (grads[3, None] - theirs.grad).norm() / theirs.grad.norm() <= 1e-6


def test_training_through_the_inferer_keeps_the_graph_and_gives_parameter_gradients():
    torch.manual_seed(0)
    net = nn.Conv3d(1, 2, 3, padding=1)
    x = torch.rand(1, 1, 10, 10, 10)
    SlidingWindow(net, (8, 8, 8))(x).sum().backward()  # auto: graph, parameters get gradients
    ours = net.weight.grad.clone()
    net.weight.grad = None
    monai(x, net, (8, 8, 8)).sum().backward()
    assert torch.allclose(ours, net.weight.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="memory='graph'"):
        SlidingWindow(net, (8, 8, 8), memory="recompute")(x.requires_grad_(True))


def test_works_for_slices_too():
    torch.manual_seed(0)
    net = nn.Conv2d(3, 2, 3, padding=1).eval()
    x = torch.rand(2, 3, 40, 33)
    with torch.no_grad():
        ours = SlidingWindow(net, (16, 16), overlap=0.25)(x)
        theirs = sliding_window_inference(x, (16, 16), 1, net, overlap=0.25, mode="gaussian")
    assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"overlap": 1.0}, "overlap"),
        ({"mirror_axes": (3,)}, "mirror_axes"),
        ({"blend": "mean"}, "blend"),
        ({"batch_size": 0}, "batch_size"),
        ({"keep_graphs": -1}, "keep_graphs"),
        ({"graph_memory": -1}, "graph_memory"),
    ],
)
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        SlidingWindow(tiny3d(), (8, 8, 8), **kw)


def test_wrong_input_rank_is_refused():
    with pytest.raises(ValueError, match=r"\(B, C, 3 spatial axes\)"):
        SlidingWindow(tiny3d(), (8, 8, 8))(torch.rand(1, 1, 8, 8))
