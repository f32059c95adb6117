"""Every test process sees 8 CPU devices, so sharded steps run on a fake 8-device mesh."""

import os
import pathlib
import sys

import pytest

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # for `configs`
# ../shared beside the checkout: the authors' checkpoint fixtures (fixtures/official).
SHARED = pathlib.Path(ROOT).parent / 'shared'


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """A skipped test is a failure: `make test` installs every dependency and fetches every asset,
  so a skip can only mean something is missing, and nothing may pass silently for that reason."""
  outcome = yield
  report = outcome.get_result()
  if report.skipped and call.when in ('setup', 'call'):
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = 'failed'
    report.longrepr = (f'{item.nodeid} was skipped ({reason}); make test provides every '
                       'dependency and asset, so this is a failure: run make test, or fetch the '
                       'asset (python -m prime_jax.data.assets fetch ...).')
