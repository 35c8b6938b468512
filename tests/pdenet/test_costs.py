"""Cost accounting: parameter and FLOP counts agree with PyTorch's, timings are medians of real runs."""
import time

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pdenet.costs import (Costs, count_parameters, fastest_threads, flops_per_image, format_costs, measure_costs,
                          measure_latency, measure_train_step)


def small_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))


def test_parameter_count():
    net = small_net()
    assert count_parameters(net) == (3 * 8 * 9 + 8) + 16 + 8 * 9 + (8 * 10 + 10)
    net[0].weight.requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == count_parameters(net) - 3 * 8 * 9
    shared = nn.Linear(4, 4)
    assert count_parameters(nn.Sequential(shared, shared)) == 20  # shared weights counted once


def test_flops_agree_with_pytorch_counter_and_closed_form():
    net = small_net()
    flops = flops_per_image(net, (3, 16, 16))
    with FlopCounterMode(display=False) as counter:
        net.eval()(torch.randn(1, 3, 16, 16))
    assert flops == counter.get_total_flops()
    assert flops == 2 * (9 * 3 * 8 * 256 + 9 * 8 * 256 + 8 * 10)  # 2 per multiply-add: convs and linear
    net.train()
    assert flops_per_image(net, (3, 16, 16)) == flops and net.training  # mode restored


class Sleeper(nn.Module):
    """Takes a known time per call: ``delay`` seconds (plus a tiny matmul)."""

    def __init__(self, delay):
        super().__init__()
        self.delay = delay
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        time.sleep(self.delay)
        return self.lin(x.flatten(1)[:, :4])


def test_latency_is_the_median_wall_time():
    net = Sleeper(0.01)
    t = measure_latency(net, (1, 2, 2), batch_size=1, warmup=1, repeats=5)
    assert 0.01 <= t < 0.05
    assert measure_latency(Sleeper(0.0), (1, 2, 2), warmup=1, repeats=5) < 0.005


def test_train_step_timing_leaves_the_model_untouched():
    net = small_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    t = measure_train_step(net, (3, 8, 8), batch_size=4, warmup=1, repeats=2)
    assert t > 0
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_measure_costs_and_table():
    net = small_net()
    costs = measure_costs(net, (3, 8, 8), batch_size=16, train=True, warmup=1, repeats=4)
    assert isinstance(costs, Costs)
    assert costs.parameters == count_parameters(net) and costs.flops_per_image == flops_per_image(net, (3, 8, 8))
    assert costs.latency_ms > 0 and costs.throughput > 0 and costs.train_throughput > 0 and costs.batch_size == 16
    assert measure_costs(net, (3, 8, 8), batch_size=4, warmup=0, repeats=1).train_throughput is None
    table = format_costs({"small": costs, "again": costs})
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["model", "params"] and len(lines) == 4
    assert lines[2].startswith("small") and f"{costs.parameters:,}" in lines[2]
    assert costs.as_dict()["flops_per_image"] == costs.flops_per_image


@pytest.mark.parametrize("shape", [(3, 8), (0, 8, 8), (1, 3, 8, 8)])
def test_bad_input_shape(shape):
    with pytest.raises(ValueError, match="input_shape must be"):
        flops_per_image(small_net(), shape)


def test_bad_timing_arguments():
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure_latency(small_net(), (3, 4, 4), repeats=0)


def test_fastest_threads_times_each_candidate_and_keeps_the_best():
    before = torch.get_num_threads()
    try:
        best, rates = fastest_threads(small_net(), (3, 8, 8), 8, [2, 1, 2])
        assert sorted(rates) == [1, 2] and all(r > 0 for r in rates.values())
        assert rates[best] == max(rates.values()) and torch.get_num_threads() == best
        with pytest.raises(ValueError, match="thread counts must be positive"):
            fastest_threads(small_net(), (3, 8, 8), 8, [0])
    finally:
        torch.set_num_threads(before)


def test_measurements_leave_the_global_random_state_alone():
    net = small_net()
    state = torch.get_rng_state()
    measure_costs(net, (3, 8, 8), batch_size=4, train=True, warmup=0, repeats=1)
    assert torch.equal(torch.get_rng_state(), state)


class LayoutRecorder(nn.Module):
    """The identity; records whether each input it sees is NHWC in memory (channel stride 1), also from a deep
    copy (``seen.append`` is kept, not copied)."""

    def __init__(self, seen: list):
        super().__init__()
        self.record = seen.append

    def forward(self, x):
        self.record(x.stride(1) == 1)
        return x


@pytest.mark.parametrize("measure", ["latency", "train_step"])
def test_channels_last_timing_runs_a_one_channel_network_in_nhwc(measure):
    """A 1-channel batch is NCHW and NHWC at once; the timed network must still run NHWC after its first
    convolution (its weights converted), as training with --channels-last does, and the model keeps its layout."""
    seen = []
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), LayoutRecorder(seen), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if measure == "latency":
        measure_latency(net, (1, 8, 8), batch_size=4, warmup=0, repeats=1, channels_last=True)
    else:
        measure_train_step(net, (1, 8, 8), batch_size=4, warmup=0, repeats=1, channels_last=True)
    assert seen and all(seen)
    assert net[0].weight.is_contiguous()  # the caller's model is not converted
    seen.clear()
    measure_latency(net, (1, 8, 8), batch_size=4, warmup=0, repeats=1)
    assert seen and not any(seen)


def test_timing_spread_and_the_busy_machine_warning(monkeypatch, capsys):
    """``spread`` is the interquartile range over the median; ``pdenet cost`` reports it per model and warns where
    it says the machine is busy."""
    from pdenet import costs
    from pdenet.cli import main

    assert costs.spread([2.0, 2.0, 2.0, 2.0]) == 0.0 and costs.spread([1.0, 2.0]) == 0.0
    assert costs.spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(3.0 / 3.0)
    noisy = costs.Costs(parameters=1, flops_per_image=2, latency_ms=1.0, throughput=1.0, train_throughput=None,
                        batch_size=4, latency_spread=0.6)
    monkeypatch.setattr(costs, "measure_costs", lambda *args, **kwargs: noisy)
    assert main(["cost", "--config", "lean-resnet20", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert "1.00 ±60%" in captured.out and "the machine looks busy" in captured.err
