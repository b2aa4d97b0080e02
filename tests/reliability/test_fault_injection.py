"""The fault-injection hook itself (server/faults.py): off by default, parsed strictly, and
each fault does exactly what it says to a real forward."""

import pytest
import torch

from denoised.server.faults import Faults, parse_faults
from denoised.server.settings import Settings


def forward(x, t, y):
    return x * 2 + t.view(-1, 1, 1, 1)


def test_off_unless_named():
    assert Settings().fault_injection == ""
    faults = parse_faults(Settings().fault_injection)
    assert not faults.active and faults.wrap(forward) is forward


def test_parse_names_values_and_errors():
    faults = parse_faults(" oom_above_rows=4, nan_label=7,forward_delay=0.25 ")
    assert faults == Faults(oom_above_rows=4, nan_label=7, forward_delay=0.25)
    with pytest.raises(ValueError, match=r"unknown fault 'explode'.*oom_above_rows"):
        parse_faults("explode=1")
    with pytest.raises(ValueError, match="nan_label: cannot parse 'x'"):
        parse_faults("nan_label=x")


def test_each_fault_acts_only_where_named():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(5, 2, 3, 3, generator=g), torch.rand(5, generator=g)
    y = torch.tensor([1, 7, 3, 7, 10])
    faulty = parse_faults("nan_label=7,raise_label=8,oom_above_rows=5").wrap(forward)
    out = faulty(x, t, y)
    expected = forward(x, t, y)
    hit = y == 7
    assert out[hit].isnan().all()
    torch.testing.assert_close(out[~hit], expected[~hit], rtol=0, atol=0)
    with pytest.raises(torch.OutOfMemoryError, match="6 rows > oom_above_rows=5"):
        faulty(torch.cat([x, x[:1]]), torch.cat([t, t[:1]]), torch.cat([y, y[:1]]))
    with pytest.raises(RuntimeError, match="label 8"):
        faulty(x, t, torch.tensor([1, 2, 8, 3, 4]))
    torch.testing.assert_close(faulty(x, t, None), forward(x, t, None))  # no labels: no NaN


def test_a_transient_out_of_memory_fires_only_the_given_number_of_times():
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 2, 3, 3, generator=g), torch.rand(4, generator=g)
    faults = parse_faults("oom_above_rows=3,oom_times=2")
    assert faults.oom_times == 2
    faulty = faults.wrap(forward)
    faulty(x[:3], t[:3], None)  # within the rows: does not count
    for _ in range(2):
        with pytest.raises(torch.OutOfMemoryError):
            faulty(x, t, None)
    torch.testing.assert_close(faulty(x, t, None), forward(x, t, None), rtol=0, atol=0)
    # Each wrapped forward (one per model) has its own count.
    with pytest.raises(torch.OutOfMemoryError):
        faults.wrap(forward)(x, t, None)
