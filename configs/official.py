"""The authors' released models (Hugging Face repo chen-hao-chao/mdm-prime): one setup per file, so
that converting and evaluating one needs the file and this config only (docs/official.md).

  python -m prime_jax.convert import --checkpoint checkpoint.ckpt \
      --config configs/official.py:setup=results_prime_l2_owt --workdir workdir/prime_l2
  python -m prime_jax.main --config configs/official.py:setup=results_prime_l2_owt \
      --workdir workdir/prime_l2 --mode eval --config.data.data_dir=/data/owt_1024

Text setups (`text/owt/<setup>/checkpoint.ckpt`, all `model=small`: D = 768, 12 blocks, 12 heads,
L = 1024, OpenWebText, GPT-2 tokens):
  results_prime_l{2,3,4,6,8}_owt      Prime trained without carry-over
  results_prime_l{2,3,4,6,8}_co_owt   Prime trained with carry-over
  results_prime_l4_owt_reproduce      the README's reproduction of Prime ℓ = 4
  results_mdm_owt_reproduce           MDLM (ℓ = 1; also results_mdm_l1_owt_reproduce)
  results_ar_owt_reproduce            the autoregressive baseline (model.name = 'ar')
Image setups (`image/<dataset>/<setup>/checkpoint-<epoch>.pth`, the paper's UNet):
  results_prime_l{1,2,3,4,8}_{cifar10,imagenet32}   (ℓ = 1 is MDM)

Evaluation protocol of the authors' corrected table (method.md §11.5): OWT validation, EMA weights,
100 batches of 512 sequences (`eval.num_batches`, `eval.batch_size`). The model runs in float32
(their CPU reference; on GPU they ran the blocks under bf16 autocast). Each text setup's
carry-over is the one it was trained with; the converter compares it with the file's own record.
Not covered: the compute-optimal (`*_opt_*`) and MDM-Prime-v2 (`results_prime_v2_*`) files, whose
sizes and embedding variants this config does not know.
"""

import re

from configs import base, cifar10, imagenet32

_TEXT = re.compile(r'results_prime_l(\d+)(_co)?_owt\Z')
_IMAGE = re.compile(r'results_prime_l(\d+)_(cifar10|imagenet32)\Z')
_ALIASES = {'results_mdm_owt_reproduce': (1, False, 'dit'),
            'results_mdm_l1_owt_reproduce': (1, False, 'dit'),
            'results_prime_l4_owt_reproduce': (4, False, 'dit'),
            'results_ar_owt_reproduce': (1, False, 'ar')}
TEXT_ELLS = (2, 3, 4, 6, 8)


def _text(ell: int, carry_over: bool, name: str):
  c = base.get_config()
  c.diffusion.ell = ell
  c.diffusion.carry_over = carry_over
  c.diffusion.objective = 'paper'  # what they trained; every likelihood printed is the bound
  c.model.name = name
  c.model.dtype = 'float32'
  c.data.source = 'owt'
  c.data.seq_len = 1024
  c.data.batch_size = 512
  c.eval.num_batches = 100
  c.eval.batch_size = 512
  return c


def get_config(arg: str = ''):
  setup = base.parse_arg(arg, setup='')['setup']
  m_text, m_image = _TEXT.match(setup), _IMAGE.match(setup)
  if setup in _ALIASES:
    c = _text(*_ALIASES[setup])
  elif m_text and int(m_text.group(1)) in TEXT_ELLS:
    c = _text(int(m_text.group(1)), bool(m_text.group(2)), 'dit')
  elif m_image:
    module = cifar10 if m_image.group(2) == 'cifar10' else imagenet32
    c = module.get_config(f'ell={int(m_image.group(1))}').copy_and_resolve_references()
  else:
    known = ([f'results_prime_l{e}{co}_owt' for e in TEXT_ELLS for co in ('', '_co')]
             + sorted(_ALIASES) + ['results_prime_l{1,2,3,4,8}_{cifar10,imagenet32}'])
    raise ValueError(f'configs/official.py: unknown setup {setup!r}; pass setup=NAME with NAME '
                     f'one of {known}.')
  c.lock()
  return c
