"""TensorBoard content: scalars, text, images, and no step shown twice after a resume. The event
files are read back with tensorboardX's protos, with TensorBoard's purge rule applied."""

import io
import json
import os
import pathlib
import struct

import jax
import numpy as np
import pytest

from prime_jax.metrics import writer as writer_lib


def _records(path: pathlib.Path):
  """The payloads of a TFRecord file: (length u64, crc u32, data, crc u32) repeated."""
  data = path.read_bytes()
  pos = 0
  while pos < len(data):
    (n,) = struct.unpack('<Q', data[pos:pos + 8])
    yield data[pos + 12:pos + 12 + n]
    pos += 12 + n + 4


def read_events(logdir) -> list[tuple[str, int, object]]:
  """(tag, step, value) of every summary under logdir as TensorBoard shows them: files in the order
  they were started, and a SessionLog START at step P (tensorboardX's purge_step) hides what
  earlier files logged at steps >= P. value: float (scalar), str (text) or uint8 array (image)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  files = []
  for path in pathlib.Path(logdir).glob('events.out.tfevents.*'):
    events = [event_pb2.Event.FromString(r) for r in _records(path)]
    files.append((events[0].wall_time if events else 0.0, path.name, events))
  shown = []
  for _, _, events in sorted(files):
    for e in events:
      if e.HasField('session_log') and e.session_log.status == event_pb2.SessionLog.START:
        shown = [x for x in shown if x[1] < e.step]
      for v in e.summary.value:
        kind = v.WhichOneof('value')
        if kind == 'simple_value':
          shown.append((v.tag, e.step, v.simple_value))
        elif kind == 'image':
          image = Image.open(io.BytesIO(v.image.encoded_image_string))
          shown.append((v.tag, e.step, np.asarray(image)))
        elif kind == 'tensor':
          shown.append((v.tag, e.step, v.tensor.string_val[0].decode()))
  return shown


def test_resume_shows_no_step_twice_in_tensorboard_or_metrics_jsonl(tmp_path):
  w = writer_lib.MetricWriter(str(tmp_path), enabled=True)
  w.text(0, 'config', '{\n  "seed": 1\n}')
  for step in range(1, 7):
    w.write(step, {'loss': float(step)}, prefix='train/')
  w.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 7, "train/lo')  # a crash cut the last row short
  # The run died after step 6; its newest checkpoint is step 4.
  w = writer_lib.MetricWriter(str(tmp_path), enabled=True)
  w.resume(4)
  for step in range(5, 8):
    w.write(step, {'loss': 10.0 * step}, prefix='train/')
  w.close()
  events = read_events(tmp_path / 'tensorboard')
  want = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0), (7, 70.0)]
  assert sorted((s, v) for tag, s, v in events if tag == 'train/loss') == want
  rows = writer_lib.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [(r['step'], r['train/loss']) for r in rows] == want
  config = [v for tag, s, v in events if tag.startswith('config')]
  assert len(config) == 1 and json.loads(config[0]) == {'seed': 1}  # shown as written


def test_text_images_and_the_commands_files(tmp_path):
  """--mode commands write TensorBoard only (no metrics.jsonl rows), each into a file of its own,
  beside the training's; text is verbatim, images come back as written."""
  train = writer_lib.MetricWriter(str(tmp_path), enabled=True)
  train.write(3, {'loss': 1.5}, prefix='train/')
  mode = writer_lib.MetricWriter(str(tmp_path), enabled=True, mode='fid')
  grid = np.zeros((6, 4, 1), np.uint8)
  grid[2:4, 1:3] = 200
  mode.image(3, 'mode_fid/grid', grid)
  mode.write(3, {'fid': 12.5}, prefix='mode_fid/')
  mode.text(3, 'mode_sample/x', '# not a title\n  two spaces')
  mode.close()
  train.close()
  events = {tag: v for tag, _, v in read_events(tmp_path / 'tensorboard')}
  assert events['train/loss'] == 1.5 and events['mode_fid/fid'] == 12.5
  image = events['mode_fid/grid']
  assert image.shape[:2] == (6, 4) and np.array_equal(image[..., 0], grid[..., 0])
  assert events['mode_sample/x/text_summary'] == '    # not a title\n      two spaces'
  assert [r['step'] for r in writer_lib.read_jsonl(tmp_path / 'metrics.jsonl')] == [3]
  assert len(list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))) == 2


@pytest.mark.slow  # a tiny real run, then --mode sample and --mode eval on it (~30 s)
def test_a_run_and_its_commands_in_tensorboard(tmp_path, capfd):
  """Training logs the config (text, at the start), its scalars and its evaluations (with a
  progress bar); --mode sample adds samples as text and prints the first two, --mode eval its
  numbers: all at the checkpoint's step in the run's TensorBoard log."""
  from prime_jax import build, evaluate, sample  # pylint: disable=import-outside-toplevel
  from prime_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  from tests.test_train import tiny_config  # pylint: disable=import-outside-toplevel
  run = {'train.num_steps': 3, 'train.eval_every': 3, 'train.ckpt_every': 3, 'data.seq_len': 16,
         'eval.num_batches': 1, 'sample.num_samples': 3, 'sample.batch_size': 3,
         'sample.steps': 4}
  workdir = str(tmp_path / 'run')
  train_lib.train_and_evaluate(tiny_config(**run), workdir, devices=jax.devices()[:1])
  out, err = capfd.readouterr()
  assert 'eval sotu/validation' in err and '1/1' in err  # the evaluation's progress bar
  assert 'mfu' in out and '% (assumed peak) eta' in out  # a CPU's peak is a guess
  exp = build.experiment(tiny_config(**run))
  sample.run_sample(exp, workdir)
  out, _ = capfd.readouterr()
  printed = [line for line in out.splitlines() if line.startswith('sample ')]
  assert [line.split(':')[0] for line in printed] == ['sample 0', 'sample 1']
  assert all(len(line) <= len('sample 0: ') + 200 for line in printed)
  evaluate.run_eval(exp, workdir)
  events = read_events(os.path.join(workdir, 'tensorboard'))
  by_tag = {}
  for tag, step, value in events:
    by_tag.setdefault(tag, []).append((step, value))
  (config_step, config), = by_tag['config/text_summary']
  assert config_step == 0 and json.loads(config.replace('\n    ', '\n'))['train']['num_steps'] == 3
  assert [s for s, _ in by_tag['train/loss']] == [1, 2, 3]
  assert [s for s, _ in by_tag['eval/nll']] == [3]
  (text_tag,) = [t for t in by_tag if t.startswith('mode_sample/') and t.endswith('text_summary')]
  ((step, text),) = by_tag[text_tag]
  assert step == 3 and text.count('sample ') == 3
  assert [s for s, _ in by_tag['mode_sample/n3_T4_fp64/nfe_per_batch']] == [3]
  ((step, nll),) = by_tag['mode_eval/sotu_validation/nll']
  # The same evaluation as training's at step 3 (same weights and draws; here on 8 devices).
  assert step == 3 and nll == pytest.approx(by_tag['eval/nll'][0][1], rel=1e-5)
