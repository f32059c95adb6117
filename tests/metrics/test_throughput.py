"""The training rate and ETA leave evaluations and compilation out; MFU says when its peak is a
guess."""

import pytest

from prime_jax.metrics import throughput


def test_eta_after_an_evaluation_is_not_inflated():
  # 1000 steps at 2 steps/s after a 30 s compilation; a 300 s evaluation after step 100.
  clock = throughput.StepClock(0, 0.0, num_steps=1000)
  clock.exclude(30.0)
  rate, eta = clock.tick(50, 30.0 + 25.0)
  assert rate == pytest.approx(2.0) and eta == pytest.approx(475.0)
  rate, eta = clock.tick(100, 80.0)
  assert rate == pytest.approx(2.0) and eta == pytest.approx(450.0)
  clock.exclude(300.0)  # the evaluation at step 100
  rate, eta = clock.tick(150, 80.0 + 300.0 + 25.0)
  assert rate == pytest.approx(2.0) and eta == pytest.approx(425.0)
  # The step rate changes: the log line shows the window's rate, the ETA the mean since the start.
  rate, eta = clock.tick(200, 405.0 + 50.0)
  assert rate == pytest.approx(1.0)
  assert eta == pytest.approx(800 / (200 / 125.0))  # 200 steps in 455 - 330 s of training


def test_eta_of_a_resumed_run_counts_only_its_own_steps():
  clock = throughput.StepClock(600, 10.0, num_steps=1000)
  rate, eta = clock.tick(700, 60.0)
  assert rate == pytest.approx(2.0) and eta == pytest.approx(150.0)


def test_peak_is_assumed_unless_known_or_given(monkeypatch):
  class Device:
    device_kind = 'cpu'
  monkeypatch.setattr(throughput.jax, 'devices', lambda: [Device()])
  assert throughput.peak_is_assumed(0.0)
  assert not throughput.peak_is_assumed(1e12)
  Device.device_kind = 'NVIDIA H100 80GB HBM3'
  assert not throughput.peak_is_assumed(0.0)
  assert throughput.peak_flops_per_device() == 989e12


def test_bench_counts_the_model_flops_against_both_peaks():
  """--mode bench: tokens/s from the step time; the MFU against the documented peak and against
  the matmul it measures count the same model FLOPs (the analytic count, every row through the
  full head)."""
  from prime_jax import bench, build
  from tests.test_train import tiny_config
  cfg = tiny_config(**{'train.bench_steps': 2})
  r = bench.run(build.experiment(cfg))
  assert r['tokens_per_s'] == pytest.approx(r['batch'] * r['seq_len'] / r['step_s'])
  assert r['measured_matmul_flops'] > 0
  model_flops_s = r['mfu'] * r['peak_flops']
  assert r['mfu_measured_peak'] * r['measured_matmul_flops'] == pytest.approx(model_flops_s)
