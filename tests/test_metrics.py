"""nanoseek/metrics.py: the matmul peak that CPU MFU is measured against."""
import pytest
import torch

from nanoseek import metrics as M


def test_peak_is_measured_on_smaller_products_where_the_dtype_multiplies_slowly(monkeypatch):
    """A dtype at 1 GFLOP/s (bf16 on a CPU without bf16 arithmetic) is measured on 256^3 products, one at 20 on
    512^3 and a fast one on 1024^3, as a probe at 256 predicts; the peak is the rate of the products timed."""
    sizes = []

    def at(rate):
        def seconds(device, dtype, n, reps):
            sizes.append(n)
            return 2 * n ** 3 / rate
        return seconds

    for rate, n in ((1e9, 256), (2e10, 512), (2e11, 1024)):
        sizes.clear()
        monkeypatch.setattr(M, "_matmul_seconds", at(rate))
        assert M.measure_matmul_flops(torch.device("cpu"), torch.float32) == pytest.approx(rate)
        assert sizes == [256, n]  # the probe, then the measurement


def test_peak_of_this_cpu_is_a_rate():
    peak, source = M.peak_flops(torch.device("cpu"), torch.float32)
    assert 1e8 < peak < 1e15 and "measured" in source
