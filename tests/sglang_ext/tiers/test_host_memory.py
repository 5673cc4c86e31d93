"""HostSlab: page-aligned host memory of exactly the asked size, pinned on CUDA machines and unpinned
however it goes (close, or dropped), so that a later slab at the same addresses can be pinned."""

from __future__ import annotations

import gc
import mmap

import pytest
import torch

from kvtier.sglang_ext.tiers.host_memory import HostSlab

CUDA = torch.cuda.is_available()


def test_a_slab_is_page_aligned_exactly_sized_and_its_views_share_memory():
    slab = HostSlab(3 * mmap.PAGESIZE + 100, pin=False)
    assert slab.tensor.numel() == 3 * mmap.PAGESIZE + 100
    assert slab.tensor.data_ptr() % mmap.PAGESIZE == 0
    slab.view(mmap.PAGESIZE, 8).fill_(7)
    assert slab.tensor[mmap.PAGESIZE : mmap.PAGESIZE + 8].tolist() == [7] * 8
    slab.close()
    slab.close()  # a second close is a no-op


def test_a_view_outlives_its_dropped_or_closed_slab():
    """PoolIO and the tier store keep views, not always the slab; the memory must stay theirs."""
    for close in (False, True):
        slab = HostSlab(2 * mmap.PAGESIZE, pin=CUDA)
        view = slab.view(mmap.PAGESIZE, 16)
        if close:
            slab.close()  # views alive: the mapping stays until the last one goes
            slab.close()
        del slab
        gc.collect()
        view.fill_(5)
        assert view.tolist() == [5] * 16
        if CUDA and not close:
            assert view.is_pinned(), "a dropped slab's live view was unpinned"


def test_a_size_of_zero_is_refused():
    with pytest.raises(ValueError, match="positive"):
        HostSlab(0)


@pytest.mark.skipif(not CUDA, reason="pinning needs CUDA")
@pytest.mark.parametrize("close", [True, False], ids=["closed", "dropped"])
def test_slabs_made_again_and_again_are_pinned_each_time(close):
    """A slab dropped without close() once left its range registered; the next mmap of that size got
    the same addresses and cudaHostRegister failed with error 712 (seen on an H100 in test_pool_io)."""
    for _ in range(4):
        slab = HostSlab(1 << 20)
        assert slab.pinned
        view = slab.view(0, 4096)
        if close:
            slab.close()
        del slab
        gc.collect()
        if not close:
            assert view.is_pinned()  # pinned while a view lives (unpinned early, PoolIO refused it)
        del view
        gc.collect()
