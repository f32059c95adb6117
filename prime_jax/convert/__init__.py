"""The authors' checkpoints in and out (docs/official.md).

  python -m prime_jax.convert import --checkpoint FILE --config CFG --workdir W [--weights ema|raw]
  python -m prime_jax.convert export --workdir W --out FILE [--config CFG] [--step N]

Text: the Lightning `.ckpt` of MDLM (DIT, ℓ = 1), Prime (PerceiverDIT, ℓ > 1) and the AR baseline.
Images: the `.pth` of the discrete UNet (the EMA wrapper's state dict). Files are read without
torch (prime_jax.torchfile), one tensor at a time. An imported workdir holds an ordinary training
checkpoint at the file's step: the raw weights as `params`, the chosen weights as `ema` (`--weights
raw` puts the raw weights in both), a fresh optimizer state; `--mode eval|sample|fid` run on it
unchanged. For notebooks, `load(FILE, config)` returns the model itself.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx

from prime_jax import build, report, torchfile
from prime_jax import checkpoint as checkpoint_lib
from prime_jax import sharding as sharding_lib
from prime_jax.convert import common, image, text

WEIGHTS = ('ema', 'raw')
ConversionError = common.ConversionError


@dataclasses.dataclass
class Converted:
  """A file's weights as our parameters."""
  graphdef: Any
  params: nnx.State  # the raw training weights
  ema: nnx.State  # the chosen weights: the file's EMA ('ema') or its raw weights again ('raw')
  step: int  # the file's optimizer step count
  kind: str  # 'text' | 'image'
  file_config: dict  # the training settings the file records
  notes: list[str]  # settings the converter changed so that the model matches the file

  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.ema)


def kind_of(root: Any, source: str) -> str:
  """'text' for a Lightning checkpoint, 'image' for the authors' image training state."""
  if isinstance(root, dict) and 'state_dict' in root and 'pytorch-lightning_version' in root:
    return 'text'
  if isinstance(root, dict) and isinstance(root.get('model'), dict) and any(
      k.startswith('model.') for k in root['model']):
    return 'image'
  keys = sorted(root)[:8] if isinstance(root, dict) else type(root).__name__
  raise ConversionError(f'{source}: neither an MDM-Prime text checkpoint (a Lightning .ckpt with '
                        f'state_dict) nor an image one (a .pth with model.*); it holds {keys}.')


def matching_config(config, root: Any, kind: str, source: str):
  """(config, notes): the config with the model settings the file's network needs (rotary base
  10000, no distance penalty, the file's time conditioning); every change is named in `notes`.
  Settings that shapes cannot reveal (carry-over, ℓ) are compared with the file's own record."""
  notes, changes = [], {}
  if kind == 'text':
    fc = text.file_config(root)
    if config.model.rope_base != 10000.0:
      changes['model.rope_base'] = 10000.0
    if config.model.distance_bias_slope != 0.0:
      changes['model.distance_bias_slope'] = 0.0
    tc = fc.get('time_conditioning')
    if isinstance(tc, bool) and tc != config.model.time_conditioning:
      changes['model.time_conditioning'] = tc
    prime = fc.get('prime') or {}
    if config.model.name != 'ar' and 'target_length' in prime and (
        int(prime['target_length']) != config.diffusion.ell):
      raise ConversionError(
          f'{source} was trained with ℓ = {prime["target_length"]} (prime.target_length), this '
          f'config has diffusion.ell = {config.diffusion.ell}. Use the config of that setup.')
    if fc.get('backbone') == 'ar' and config.model.name != 'ar':
      raise ConversionError(f'{source} is the authors\' autoregressive baseline: convert it with '
                            "model.name='ar' (configs/official.py:setup=results_ar_owt_reproduce).")
    if 'carry_over' in prime and bool(prime['carry_over']) != config.diffusion.carry_over:
      notes.append(f'the file was trained with carry_over={bool(prime["carry_over"])}; this config '
                   f'evaluates with diffusion.carry_over={config.diffusion.carry_over} (both are '
                   'valid bounds; the setup configs use the training setting).')
  else:
    fc = image.describe(root.get('args'))
    if config.model.time_conditioning:
      changes['model.time_conditioning'] = False
    if 'target_length' in fc and int(fc['target_length']) != config.diffusion.ell:
      raise ConversionError(
          f'{source} was trained with ℓ = {fc["target_length"]} (args.target_length), this config '
          f'has diffusion.ell = {config.diffusion.ell}. Use the config of that setup.')
  if changes:
    config = config.copy_and_resolve_references()
    with config.unlocked():
      for path, value in changes.items():
        section, field = path.split('.')
        old = config[section][field]
        config[section][field] = value
        notes.append(f'set {path}={value} (was {old}): the authors\' network has it.')
  return config, notes, fc


def read(path: Union[str, os.PathLike], config, *, weights: str = 'ema'):
  """(Experiment, Converted, config actually used) for a file and a config (a ConfigDict or a
  'configs/x.py:arg' string). The file's tensors are read one at a time."""
  if weights not in WEIGHTS:
    raise ValueError(f'weights must be one of {WEIGHTS}, got {weights!r}.')
  path = str(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No checkpoint file at {path}.')
  if isinstance(config, str):
    config = build.load_config(config)
  source = os.path.basename(path)
  with torchfile.TorchFile(path) as f:
    root = f.root
    kind = kind_of(root, source)
    config, notes, fc = matching_config(config, root, kind, source)
    exp = build.experiment(config)
    if (kind == 'image') != exp.task.image:
      raise ConversionError(f'{source} is an {kind} checkpoint, but the config is for '
                            f'{"images" if exp.task.image else "text"}.')
    graphdef, abstract, _ = build.abstract_params(exp.make_model)
    module = nnx.eval_shape(lambda: exp.make_model(rngs=nnx.Rngs(0)))
    hint = ('Use the config of the setup the file comes from (configs/official.py:setup=...), or '
            'set the sizes (model.dim, num_layers, num_heads, diffusion.ell) to the file\'s.')
    trees = {}
    for which in ('raw',) + (('ema',) if weights == 'ema' else ()):
      if kind == 'text':
        tree = common.ParamTree(abstract, source=source, hint=hint)
        scanned = bool(getattr(module, 'scan_layers', False))
        text.import_params(text.weights(root, which, source=source), tree, module.num_layers,
                           autoregressive=exp.task.autoregressive, scanned=scanned)
        trees[which] = tree.state()
      else:
            trees[which] = image.import_unet(root['model'], abstract, weights=which, source=source)
    if kind == 'text':
      inv = root['state_dict'].get(text.PREFIX + text.INV_FREQ)
      if inv is not None and abs(text.rope_base(common.array(inv)) - 10000.0) > 1.0:
        raise ConversionError(f'{source}: rotary base {text.rope_base(common.array(inv)):.0f}; '
                              'the authors\' models use 10000.')
      step = int(root.get('global_step', 0))
    else:
      step = int(common.array(root['model'].get('num_updates', 0)))
  return exp, Converted(graphdef, trees['raw'], trees.get('ema', trees['raw']), step, kind, fc,
                        notes), config


def load(path: Union[str, os.PathLike], config, weights: str = 'ema') -> nnx.Module:
  """The file's network as our NNX model, ready to call (fp32 parameters)."""
  _, converted, _ = read(path, config, weights=weights)
  return converted.model()


def import_checkpoint(path: Union[str, os.PathLike], config, workdir: str, *,
                      weights: str = 'ema') -> dict[str, Any]:
  """Writes the file as a training checkpoint of WORKDIR (at the file's step) with the config
  used and a record of the conversion (converted.json). Refuses a workdir that has checkpoints."""
  from prime_jax import train  # pylint: disable=import-outside-toplevel
  existing = epath.Path(checkpoint_lib.checkpoint_dir(workdir))  # local or gs://
  if existing.exists() and any(existing.iterdir()):
    raise FileExistsError(f'{workdir} already holds checkpoints ({existing}); import into a new '
                          '--workdir.')
  exp, conv, config = read(path, config, weights=weights)  # nothing is written before this works
  for note in conv.notes:
    report.emit(f'convert: {note}')
  mesh = sharding_lib.make_mesh(exp.mesh_axes)  # no batch runs: any batch size will do
  tx, _ = exp.make_optimizer()
  _, _, sh = train.state_shardings(exp.make_model, tx, mesh)
  params = jax.device_put(conv.params, sh.params)
  ema = jax.device_put(conv.ema, sh.ema)
  opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(params)
  state = train.TrainState(step=jax.device_put(jnp.int32(conv.step), sh.step), params=params,
                           opt_state=opt_state, ema=ema)
  record = {'file': os.path.abspath(str(path)), 'bytes': os.path.getsize(path),
            'weights': weights, 'step': conv.step, 'kind': conv.kind, 'notes': conv.notes,
            'file_config': conv.file_config}
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=None, async_save=False)
  ckpt.save(conv.step, state, meta={'config_summary': exp.summary, 'converted_from': record})
  ckpt.close()
  checkpoint_lib.write_json(f'{workdir}/config.json', config.to_dict())
  checkpoint_lib.write_json(f'{workdir}/converted.json', record)
  n = build.count_params(conv.params)
  report.emit(f'convert: {os.path.basename(str(path))} ({conv.kind}, step {conv.step}, '
              f'{n:,} parameters, {weights} weights) -> {ckpt.directory}/{conv.step}')
  return dict(record, params=n, workdir=workdir)


def export_checkpoint(workdir: str, out: str, config=None, *,
                      step: Optional[int] = None) -> dict[str, Any]:
  """Writes WORKDIR's checkpoint in the authors' format: a Lightning `.ckpt` (text) or the image
  `.pth` (`model` = their EMA wrapper's state dict). `config` defaults to WORKDIR/config.json."""
  if config is None:
    config = build.load_config(os.path.join(workdir, 'config.json'))
  elif isinstance(config, str):
    config = build.load_config(config)
  exp = build.experiment(config)
  mesh = sharding_lib.make_mesh(exp.mesh_axes)  # no batch runs: any batch size will do
  _, abstract, _ = build.sharded_abstract_params(exp.make_model, mesh)
  raw, step = checkpoint_lib.restore_params(workdir, abstract, step=step, which='params')
  ema, _ = checkpoint_lib.restore_params(workdir, abstract, step=step, which='ema')
  raw, ema = common.by_path(raw), common.by_path(ema)
  module = nnx.eval_shape(lambda: exp.make_model(rngs=nnx.Rngs(0)))
  if exp.task.image:
    obj = {'model': image.export_unet(raw, ema, num_updates=step), 'epoch': 0}
  else:
    if getattr(module, 'distance_bias_slope', 0.0) or getattr(module, 'rope_base', 1e4) != 1e4:
      raise ConversionError('this model uses a distance penalty or a rotary base other than 10000;'
                            ' the authors\' network has neither, so their code cannot run it.')
    obj = text.lightning_checkpoint(
        raw, ema, num_layers=module.num_layers, head_dim=module.dim // module.num_heads,
        autoregressive=exp.task.autoregressive, scanned=bool(getattr(module, 'scan_layers', 0)),
        step=step, ema_decay=exp.optim.ema_decay)
  if jax.process_index() == 0:
    torchfile.write(obj, out)
  report.emit(f'convert: {workdir} step {step} -> {out} ({"image" if exp.task.image else "text"}'
              f', {os.path.getsize(out):,} bytes)')
  return {'out': out, 'step': step}

