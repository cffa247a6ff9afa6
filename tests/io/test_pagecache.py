"""Page-cache control of mapped files: populate maps a range into this process, release drops it
again (the bytes still read back), mincore reports what is cached."""

import mmap
import sys

import numpy as np
import pytest

from fusion_kernels.io import pagecache

PAGE = mmap.PAGESIZE
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise via libc")


@pytest.fixture
def mapped(tmp_path):
    path = tmp_path / "data"
    data = np.random.default_rng(0).integers(0, 256, 1024 * PAGE, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    with open(path, "rb") as fh:
        mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    address = np.frombuffer(mapping, dtype=np.uint8, count=1).ctypes.data
    yield mapping, address, data
    mapping.close()


def resident_in_process(address: int, length: int) -> int:
    """Bytes of ``[address, address + length)`` in this process's memory (from smaps)."""
    with open("/proc/self/smaps") as fh:
        lines = fh.read().splitlines()
    for index, line in enumerate(lines):
        span = line.split()[0]
        if "-" in span and all(c in "0123456789abcdef-" for c in span):
            start, end = (int(part, 16) for part in span.split("-"))
            if start <= address < end and address + length <= end:
                for entry in lines[index + 1 :]:
                    if entry.startswith("Rss:"):
                        return int(entry.split()[1]) * 1024
    raise AssertionError("mapping not found")


def test_whole_pages_cover_a_range_within_the_mapping(mapped):
    mapping, _, _ = mapped
    assert pagecache.whole_pages(mapping, 10, 5) == (0, 15)
    assert pagecache.whole_pages(mapping, PAGE + 1, PAGE) == (PAGE, PAGE + 1)
    end = len(mapping)
    assert pagecache.whole_pages(mapping, end - 3, 3) == (end - PAGE, PAGE)


def test_populate_maps_a_range_in_and_release_drops_it(mapped):
    mapping, address, data = mapped
    length = 512 * PAGE
    # A page or two may be mapped in around a read by the kernel (fault-around): a bound, not 0.
    pagecache.release(mapping, 0, len(mapping))
    assert resident_in_process(address, length) < length // 4
    pagecache.populate(address, mapping, 0, length)
    assert resident_in_process(address, length) >= length
    pagecache.release(mapping, 0, length)
    assert resident_in_process(address, length) < length // 4
    # Dropped from the process, not lost: the private mapping reads the file again.
    assert np.array_equal(np.frombuffer(mapping, dtype=np.uint8), data)


def test_populate_range_and_advise_act_on_whole_pages(mapped):
    mapping, address, _ = mapped
    pagecache.release(mapping, 0, len(mapping))
    pagecache.populate_range(address + 5, 2 * PAGE)
    assert resident_in_process(address, 3 * PAGE) >= 3 * PAGE
    assert pagecache.advise(address + 1, PAGE, mmap.MADV_DONTNEED)
    assert not pagecache.advise(address, 0, mmap.MADV_DONTNEED)


def test_a_file_just_written_is_reported_cached(mapped):
    mapping, address, _ = mapped
    pagecache.populate(address, mapping, 0, len(mapping))
    assert pagecache.resident_share(address, mapping, 0, len(mapping)) == 1.0
    assert pagecache.resident_share(address, mapping, 0, 0) in (0.0, 1.0)
