import itertools

import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference

from seg.inference.slabs import plan_slabs, sliding_window_labels, window_starts


@pytest.mark.parametrize("size,roi,overlap", [(400, 96, 0.5), (97, 32, 0.25), (100, 96, 0.5), (50, 16, 0.0), (7, 1, 0.5)])
def test_window_starts_are_monais(size, roi, overlap):
    interval = max(int(roi * (1 - overlap)), 1)
    expected = [s[0].start for s in dense_patch_slices([size], [roi], [interval])]
    assert window_starts(size, roi, overlap) == expected
    assert window_starts(size, roi, overlap)[-1] == size - roi  # the last window is clamped to the end


@pytest.mark.parametrize("size,roi,overlap,max_length", list(itertools.product(
    [5, 40, 97, 143, 400], [1, 8, 32, 96], [0.0, 0.25, 0.5, 0.75], [1, 10, 50, 120, 10_000])))
def test_slabs_tile_the_axis_on_the_window_grid(size, roi, overlap, max_length):
    slabs = plan_slabs(size, roi, overlap, max_length)
    starts = window_starts(size, roi, overlap)
    ends = [min(s + roi, size) for s in starts]
    assert slabs[0].keep_start == 0 and slabs[-1].keep_stop == size
    for before, after in zip(slabs, slabs[1:]):
        assert before.keep_stop == after.keep_start and after.start > before.start
    for slab in slabs:
        assert slab.start <= slab.keep_start < slab.keep_stop <= slab.stop <= size
        assert slab.start in starts and (slab.stop in ends or slab.stop == size)
        # every window covering a kept voxel lies inside the slab
        for start, end in zip(starts, ends):
            if start < slab.keep_stop and end > slab.keep_start:
                assert slab.start <= start and end <= slab.stop, (slab, start, end)
    if size > roi and max_length >= size:
        assert len(slabs) == 1


def small_network(out_channels=3):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4), torch.nn.ReLU(),
                               torch.nn.Conv3d(4, out_channels, 3, padding=1)).eval()


@pytest.mark.parametrize("shape,roi,overlap", [
    ((30, 20, 50), (16, 16, 16), 0.5),
    ((30, 21, 47), (16, 12, 10), 0.25),
    ((9, 33, 70), (9, 16, 16), 0.5),
    ((40, 40, 40), (16, 16, 16), 0.0),
    ((24, 20, 11), (16, 16, 1), 0.5),  # a 2D model's window: one slice
])
def test_labels_in_slabs_equal_the_whole_volume_argmax(shape, roi, overlap, monkeypatch):
    import seg.inference.slabs as slabs_module

    passes = []
    monkeypatch.setattr(slabs_module, "sliding_window_inference",
                        lambda *a, **k: passes.append(a[0].shape) or sliding_window_inference(*a, **k))
    net = small_network()
    image = torch.randn(2, 1, *shape)
    calls = []

    def predictor(window):
        calls.append(window.shape[0])
        return net(window)

    with torch.no_grad():
        expected = sliding_window_inference(image, roi, 3, net, overlap=overlap, mode="gaussian").argmax(1, keepdim=True)
        whole = sliding_window_labels(image, roi, 3, predictor, 3, overlap=overlap)
        whole_windows = sum(calls)
        assert len(passes) == 1
        calls.clear()
        slabbed = sliding_window_labels(image, roi, 3, predictor, 3, overlap=overlap, max_buffer_bytes=1)
    assert whole.dtype == slabbed.dtype == torch.uint8 and whole.shape == (2, 1, *shape)
    assert torch.equal(whole.long(), expected)
    assert torch.equal(slabbed.long(), expected)
    assert len(passes) > 2  # it did cut slabs...
    assert sum(calls) >= whole_windows  # ...rerunning the windows that straddle a seam, if any


def test_a_budget_the_volume_fits_in_is_one_pass():
    net = small_network()
    image = torch.randn(1, 1, 20, 20, 40)
    windows = []
    with torch.no_grad():
        sliding_window_labels(image, (16, 16, 16), 4, lambda w: windows.append(w.shape[0]) or net(w), 3,
                              overlap=0.5, max_buffer_bytes=4 * 4 * image.numel())
    assert sum(windows) == 2 * 2 * 4  # each window once: no slabs, no reruns


def test_window_engine_mirroring_streams_through_slabs_with_the_labels_of_full_maps():
    """Mirrored labels from slabs equal the argmax of the full-size mirrored softmax, and each flip runs once."""
    from seg.inference.window import WindowInference

    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.Conv3d(3, 3, 3, padding=1)).eval()
    image = torch.randn(1, 1, 20, 18, 40)
    engine = WindowInference(network, (12, 12, 12), num_classes=3, sw_batch_size=2, overlap=0.5, mirror=True)
    assert len(engine.flips) == 8
    with torch.no_grad():
        full = engine.predict(image)["scores"]
        assert torch.allclose(full.sum(1), torch.ones_like(full[:, 0]), atol=1e-5)  # mirrored: a softmax
        labels = engine.labels(image, max_buffer_bytes=4 * 20 * 18 * 12 * 4)  # forces several slabs along z
    assert torch.equal(labels, full.argmax(1, keepdim=True).to(labels.dtype))
    plain = WindowInference(network, (12, 12, 12), num_classes=3, sw_batch_size=2)
    with torch.no_grad():
        assert torch.equal(plain.labels(image), plain.predict(image)["scores"].argmax(1, keepdim=True).to(labels.dtype))
