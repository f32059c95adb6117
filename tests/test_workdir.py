"""What a workdir remembers (prime_jax.rundir) and gs:// workdirs through etils.epath: a different
config is refused before anything is written, allowed changes keep the old config, a finished run
keeps its summary, outputs are never overwritten, and a gs:// run writes nothing local."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing

from prime_jax import build, evaluate, report, rundir, sample
from prime_jax import checkpoint as checkpoint_lib
from prime_jax import train as train_lib
from prime_jax.data import owt, text
from prime_jax.metrics import writer as writer_lib
from tests.test_train import tiny_config

RUN = {'train.num_steps': 3, 'train.ckpt_every': 3, 'train.eval_every': 3}


def _train(cfg, workdir):
  """main.run's training mode on one device (faster than the 8 fake ones)."""
  summary = train_lib.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  report.print_summary(workdir, summary, source='sotu', ell=2, unigram_nll=7.0)
  return summary


def _steps(workdir):
  return sorted(int(p.name) for p in epath.Path(workdir, 'checkpoints').iterdir()
                if p.name.isdigit())


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished 3-step run (checkpoint at step 3, summary with validation numbers)."""
  workdir = str(tmp_path_factory.mktemp('finished') / 'run')
  _train(tiny_config(**RUN), workdir)
  return workdir


def _copy(workdir, tmp_path):
  out = str(tmp_path / 'run')
  shutil.copytree(workdir, out)
  return out


# -- the config a workdir records ------------------------------------------------------------------


def test_record_config_refuses_other_runs_names_five_fields_and_keeps_history(tmp_path, capsys):
  cfg = tiny_config().to_dict()
  rundir.record_config(str(tmp_path), cfg)
  first = (tmp_path / 'config.json').read_bytes()
  rundir.record_config(str(tmp_path), cfg)  # the same config: nothing new
  assert sorted(os.listdir(tmp_path)) == ['config.json']
  other = tiny_config(**{'model.dim': 64, 'model.num_layers': 3, 'optim.lr': 0.5, 'seed': 7,
                         'data.batch_size': 16, 'diffusion.ell': 1, 'data.seq_len': 16,
                         'train.num_steps': 99}).to_dict()
  with pytest.raises(ValueError) as e:
    rundir.record_config(str(tmp_path), other)
  msg = str(e.value)
  assert 'data.batch_size 8 -> 16' in msg and 'model.dim 32 -> 64' in msg
  assert 'and 2 more' in msg and 'fresh --workdir' in msg
  assert 'train.num_steps 6 -> 99' not in msg  # an allowed change is not a reason
  assert (tmp_path / 'config.json').read_bytes() == first
  assert sorted(os.listdir(tmp_path)) == ['config.json']
  allowed = tiny_config(**{'train.num_steps': 99, 'eval.num_batches': 5, 'mesh.data': 1,
                           'data.data_dir': '/elsewhere'}).to_dict()
  rundir.record_config(str(tmp_path), allowed)
  line = capsys.readouterr().out
  assert 'train.num_steps 6 -> 99' in line and 'mesh.data -1 -> 1' in line
  assert 'config.1.json' in line and line.count('\n') == 1
  assert (tmp_path / 'config.1.json').read_bytes() == first
  assert json.loads((tmp_path / 'config.json').read_text())['train']['num_steps'] == 99
  rundir.record_config(str(tmp_path), tiny_config(**{'train.num_steps': 100}).to_dict())
  assert json.loads((tmp_path / 'config.2.json').read_text())['train']['num_steps'] == 99
  # A config recorded by older code lacks the fields added since: they take their defaults.
  older = json.loads((tmp_path / 'config.json').read_text())
  del older['model']['dim']
  (tmp_path / 'config.json').write_text(json.dumps(older))
  rundir.record_config(str(tmp_path), tiny_config(**{'train.num_steps': 100}).to_dict())
  assert 'model.dim (absent) -> 32' in capsys.readouterr().out
  assert 'dim' not in json.loads((tmp_path / 'config.3.json').read_text())['model']


def test_a_different_config_is_refused_before_anything_is_written(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  before = {n: (tmp_path / 'run' / n).read_bytes()
            for n in ('config.json', 'parameters.txt', 'metrics.jsonl', 'summary.json')}
  names = sorted(os.listdir(workdir))
  with pytest.raises(ValueError, match=r'model.dim 32 -> 64.*fresh --workdir'):
    train_lib.train_and_evaluate(tiny_config(**{**RUN, 'train.num_steps': 6, 'model.dim': 64}),
                                 workdir, devices=jax.devices()[:1])
  assert {n: (tmp_path / 'run' / n).read_bytes() for n in before} == before
  assert sorted(os.listdir(workdir)) == names and _steps(workdir) == [3]


def test_an_allowed_change_resumes_and_keeps_the_old_config(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  old = (tmp_path / 'run' / 'config.json').read_bytes()
  summary = _train(tiny_config(**{**RUN, 'train.num_steps': 4, 'train.log_every': 2}), workdir)
  assert summary['steps'] == 4 and 'nll' in summary and _steps(workdir) == [3, 4]
  assert (tmp_path / 'run' / 'config.1.json').read_bytes() == old
  assert json.loads((tmp_path / 'run' / 'config.json').read_text())['train']['num_steps'] == 4


def test_a_finished_run_rerun_returns_and_keeps_its_summary(finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  saved = json.loads((tmp_path / 'run' / 'summary.json').read_text())
  assert 'nll_cv' in saved and saved['steps'] == 3
  capsys.readouterr()
  again = _train(tiny_config(**RUN), workdir)
  out = capsys.readouterr().out
  assert 'nothing to train' in out and f"PPL <= {saved['ppl_bound_cv']:.2f}" in out
  assert again['nll_cv'] == saved['nll_cv'] and again['wall_s'] == saved['wall_s']
  assert json.loads((tmp_path / 'run' / 'summary.json').read_text()) == saved
  assert _steps(workdir) == [3]
  # A summary without validation numbers never replaces one with them.
  assert not rundir.write_summary(workdir, {'steps': 3, 'params': 1})
  assert json.loads((tmp_path / 'run' / 'summary.json').read_text()) == saved


def test_outputs_are_named_by_their_settings_and_never_overwritten(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  exp = lambda **o: build.experiment(tiny_config(**{**RUN, **o}))  # noqa: E731
  one = evaluate.run_eval(exp(**{'eval.num_batches': 1}), workdir)
  two = evaluate.run_eval(exp(**{'eval.num_batches': 2}), workdir)
  again = evaluate.run_eval(exp(**{'eval.num_batches': 1}), workdir)
  assert os.path.basename(one['file']) == 'eval_step3_validation_b1x8_t1.json'
  assert os.path.basename(two['file']) == 'eval_step3_validation_b2x8_t1.json'
  assert os.path.basename(again['file']) == 'eval_step3_validation_b1x8_t1-2.json'
  for out in (one, two, again):
    saved = json.loads(epath.Path(out['file']).read_text())
    assert saved['results'][0]['batches'] == saved['settings']['num_batches']
  s = {'sample.num_samples': 2, 'sample.batch_size': 2, 'sample.steps': 4}
  first = sample.run_sample(exp(**s), workdir)['files']
  second = sample.run_sample(exp(**s), workdir)['files']
  assert [os.path.basename(f) for f in first + second] == [
      'samples_step3_n2_T4_fp64.jsonl', 'samples_step3_n2_T4_fp64.json',
      'samples_step3_n2_T4_fp64-2.jsonl', 'samples_step3_n2_T4_fp64-2.json']
  assert all(os.path.getsize(f) > 0 for f in first + second)
  stem = rundir.output_stem(workdir, 'samples_step3_n2_T4_fp64', ('.jsonl', '.json'))
  assert stem.name == 'samples_step3_n2_T4_fp64-3'


# -- gs:// through etils.epath ---------------------------------------------------------------------


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://BUCKET/... redirected into tmp_path/gcs/BUCKET/... for every epath call; Orbax's
  checkpoints (TensorStore's own GCS driver) go to the same folder through checkpoint_dir.
  Returns the stand-in's root. The test runs in tmp_path/cwd, where a local 'gs:' would appear."""
  root = tmp_path / 'gcs'
  root.mkdir()
  (tmp_path / 'cwd').mkdir()
  monkeypatch.chdir(tmp_path / 'cwd')

  def local(p):  # the mock sees local paths too: they pass through
    p = os.fspath(p)
    return str(root) + '/' + p[len('gs://'):] if p.startswith('gs://') else p

  def back(p, found):
    gs = os.fspath(p).startswith('gs://')
    return 'gs://' + os.path.relpath(found, root) if gs else found

  one = lambda fn, p, *a, **k: fn(local(p), *a, **k)  # noqa: E731
  two = lambda fn, p, q, *a, **k: fn(local(p), local(q), *a, **k)  # noqa: E731
  fns = {n: one for n in ('open', 'exists', 'isdir', 'listdir', 'makedirs', 'mkdir', 'remove',
                          'rmtree', 'stat')}
  def open_(fn, p, mode):  # GCS needs no folders: writing an object makes its "parents"
    if os.fspath(p).startswith('gs://') and set(mode) & set('wa'):
      os.makedirs(os.path.dirname(local(p)), exist_ok=True)
    return fn(local(p), mode)

  fns.update(open=open_, rename=two, replace=two, copy=two,
             glob=lambda fn, p: [back(p, x) for x in fn(local(p))],
             walk=lambda fn, p, **k: ((back(p, r), d, f) for r, d, f in fn(local(p), **k)))
  real_dir = checkpoint_lib.checkpoint_dir
  monkeypatch.setattr(checkpoint_lib, 'checkpoint_dir', lambda w: real_dir(
      local(w) if os.fspath(w).startswith('gs://') else w))
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)  # tf's backend skips the mock
  assert str(real_dir('gs://bucket/run')) == 'gs://bucket/run/checkpoints'
  with epath_testing.mock_epath(**fns):
    yield root


def _no_local_gs(tmp_path):
  found = [os.path.join(d, n) for d, dirs, files in os.walk(tmp_path) for n in dirs + files
           if n.startswith('gs:')]
  assert not found and not os.path.exists(os.path.join(os.getcwd(), 'gs:'))


def test_a_gs_workdir_trains_resumes_evaluates_and_samples_through_epath(fake_gcs, tmp_path):
  workdir = 'gs://bucket/run'
  folder = fake_gcs / 'bucket' / 'run'
  _train(tiny_config(**RUN), workdir)
  assert _steps(folder) == [3]
  summary = _train(tiny_config(**{**RUN, 'train.num_steps': 4}), workdir)  # resumes at 3
  assert summary['steps'] == 4 and _steps(folder) == [3, 4]
  cfg = build.load_config(f'{workdir}/config.json')  # what eval/sample read without --config
  assert cfg.train.num_steps == 4
  out = evaluate.run_eval(build.experiment(cfg), workdir)
  assert out['file'] == f'{workdir}/eval_step4_validation_b2x8_t1.json'
  cfg.sample.num_samples, cfg.sample.batch_size, cfg.sample.steps = 2, 2, 4
  files = sample.run_sample(build.experiment(cfg), workdir)['files']
  assert files[0] == f'{workdir}/samples_step4_n2_T4_fp64.jsonl'
  names = set(os.listdir(folder))
  assert {'config.json', 'config.1.json', 'parameters.txt', 'metrics.jsonl', 'summary.json',
          'tensorboard', 'checkpoints', 'eval_step4_validation_b2x8_t1.json',
          'samples_step4_n2_T4_fp64.jsonl', 'samples_step4_n2_T4_fp64.json'} <= names
  rows = writer_lib.read_jsonl(f'{workdir}/metrics.jsonl')  # both sessions: none overwritten
  assert [r['step'] for r in rows if 'train/loss' in r] == list(range(1, 5))
  events = list((folder / 'tensorboard').iterdir())
  assert events and all(e.stat().st_size > 100 for e in events)
  assert json.loads((folder / 'summary.json').read_text())['steps'] == 4
  _no_local_gs(tmp_path)


def test_a_gs_data_dir_is_read_through_epath(fake_gcs):
  folder = fake_gcs / 'bucket' / 'owt'
  folder.mkdir(parents=True)
  counts = np.arange(text.VOCAB_SIZE, dtype=np.int64)
  np.save(folder / 'unigram_train.npy', counts)
  meta = {'seq_len': 32, 'splits': {'train': {'shards': [], 'unigram_counts':
                                               'unigram_train.npy'}}}
  (folder / 'metadata.json').write_text(json.dumps(meta))
  assert owt.owt_metadata('gs://bucket/owt', 32) == meta
  np.testing.assert_array_equal(text.unigram_counts('owt', 'train', 32,
                                                    data_dir='gs://bucket/owt'), counts)
  with pytest.raises(FileNotFoundError, match='No prepared OpenWebText in gs://bucket/none'):
    owt.owt_metadata('gs://bucket/none', 32)
