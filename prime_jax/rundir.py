"""What a run's workdir remembers: the config it trains (and every earlier one), its end-of-run
summary, and output files named by the settings that produced them.

Paths go through etils.epath, so a workdir is a local folder or a URI such as gs://bucket/run.
Nothing is overwritten by something different: a config changed in a field that does not change
what is trained is recorded and the previous one kept as config.N.json; a config that trains
something else is refused before anything is written; an output file whose name is taken gets a
`-2`, `-3` ... suffix; a summary without validation numbers never replaces one that has them.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Sequence

import jax
from etils import epath

from prime_jax import checkpoint

# The config fields a run may resume with new values: they change how it is logged, checkpointed,
# evaluated, sampled, read or laid out on devices, not what is trained (the checkpoint restores
# onto any mesh). 'section.*' is every field of the section. Any other difference is another run.
RESUMABLE_FIELDS = (
    'train.num_steps', 'train.log_every', 'train.eval_every', 'train.ckpt_every',
    'train.keep_ckpts', 'train.peak_flops', 'train.bench_steps', 'eval.*', 'sample.*',
    'sampler.*', 'data.data_dir', 'data.worker_count', 'mesh.*',
    # the same function by another kernel (splash / cuDNN attention equal XLA's) or with another
    # rematerialisation policy
    'model.attention', 'model.attention_block', 'model.remat')

_ABSENT = object()


def _flat(tree: Mapping, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _resumable(field: str) -> bool:
  return any(field == f or (f.endswith('.*') and field.startswith(f[:-1]))
             for f in RESUMABLE_FIELDS)


def _show(flat: dict, field: str) -> str:
  v = flat.get(field, _ABSENT)
  return '(absent)' if v is _ABSENT else json.dumps(v)


def record_config(workdir: str, config: Mapping[str, Any]) -> None:
  """Records `config` (a plain dict) as WORKDIR/config.json at the start of training.

  A workdir that already records a run must be resumed with the same config up to
  RESUMABLE_FIELDS and fields the recorded config lacks (added to the code since): any other
  difference raises ValueError (up to 5 fields, old -> new) before anything is written. Allowed
  differences are printed on one line and the previous config is kept as config.N.json. Every
  process reads; process 0 writes after all have read."""
  config = json.loads(json.dumps(config, default=str))  # as it reads back from the file
  file = epath.Path(workdir) / 'config.json'
  old_text = file.read_text() if file.exists() else None
  history = None
  if old_text is not None:
    old, new = _flat(json.loads(old_text)), _flat(config)
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k, _ABSENT) != new.get(k, _ABSENT))
    if not changed:
      return
    # A field the recorded config lacks was added to the code since; its default is taken.
    refused = [k for k in changed if not _resumable(k) and k in old]
    if refused:
      shown = '; '.join(f'{k} {_show(old, k)} -> {_show(new, k)}' for k in refused[:5])
      more = f' and {len(refused) - 5} more' if len(refused) > 5 else ''
      raise ValueError(
          f'{workdir} holds a run trained with another config ({shown}{more}). A run resumes '
          f'with its own config, changed only in {", ".join(RESUMABLE_FIELDS)}; use a fresh '
          '--workdir for a different run.')
    n = 1
    while (file.parent / f'config.{n}.json').exists():
      n += 1
    history = file.parent / f'config.{n}.json'
    note = ''
    if 'train.num_steps' in changed and new.get('optim.schedule') == 'cosine':
      note = ('; optim.schedule is cosine, so the learning rate of the remaining steps follows '
              'the new train.num_steps')
    if jax.process_index() == 0:
      print(f'config: resuming {workdir} with changed settings: '
            + ', '.join(f'{k} {_show(old, k)} -> {_show(new, k)}' for k in changed)
            + f' (the previous config is kept as {history.name}){note}', flush=True)
  if jax.process_count() > 1:  # nobody writes before every process has read
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices('prime_jax_record_config')
  if jax.process_index() == 0:
    if history is not None:
      history.write_text(old_text)
    checkpoint.write_json(file, config)


# -- the summary -----------------------------------------------------------------------------------

_RESULT_KEYS = ('nll', 'bpd')  # a summary with validation numbers has one of them


def read_summary(workdir: str) -> Optional[dict[str, Any]]:
  file = epath.Path(workdir) / 'summary.json'
  return json.loads(file.read_text()) if file.exists() else None


def write_summary(workdir: str, summary: dict[str, Any]) -> bool:
  """Writes WORKDIR/summary.json, unless the one there has validation numbers this one lacks
  (returns False then: the earlier, richer summary is kept)."""
  if jax.process_index() != 0:
    return True
  old = read_summary(workdir)
  if (old is not None and any(k in old for k in _RESULT_KEYS)
      and not any(k in summary for k in _RESULT_KEYS)):
    return False
  file = epath.Path(workdir) / 'summary.json'
  file.parent.mkdir(parents=True, exist_ok=True)
  file.write_text(json.dumps(summary, indent=2))
  return True


# -- output names ----------------------------------------------------------------------------------


def output_stem(workdir: str, name: str, suffixes: Sequence[str] = ('.json',)) -> epath.Path:
  """WORKDIR/name, or name-2, name-3, ...: the first for which no file name+suffix exists, so
  that an output is never overwritten by a later command's."""
  folder = epath.Path(workdir)
  stem, n = name, 1
  while any((folder / (stem + s)).exists() for s in suffixes):
    n += 1
    stem = f'{name}-{n}'
  return folder / stem
