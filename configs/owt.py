"""OpenWebText, the reference small model and hyperparameters of method.md §9.1.

Prepare the data once (local jsonl/parquet/txt of OpenWebText documents), then train:
  python -m prime_jax.data.text prepare --input /data/openwebtext --output /data/owt_1024
  python -m prime_jax.main --config configs/owt.py:ell=4 --workdir gs://bucket/owt_l4 \
      --config.data.data_dir=/data/owt_1024
  configs/owt.py:ell=2,size=medium   the reference medium model (D = 1024, 24 blocks)
The authors' objective is the default (reproduction); every PPL printed comes from the valid bound.
"""

from configs import base

# (dim, heads, layers) of the reference small and medium models.
SIZES = {'small': (768, 12, 12), 'medium': (1024, 16, 24)}


def get_config(arg: str = ''):
  c = base.get_config()
  kv = base.parse_arg(arg, ell=4, objective='paper', carry_over=True, size='small')
  c.diffusion.ell = kv['ell']
  c.diffusion.objective = kv['objective']
  c.diffusion.carry_over = kv['carry_over']
  if kv['size'] not in SIZES:
    raise ValueError(f'configs/owt.py:size={kv["size"]}: choose one of {sorted(SIZES)}.')
  c.model.dim, c.model.num_heads, c.model.num_layers = SIZES[kv['size']]
  c.model.dtype = 'bfloat16'
  c.data.source = 'owt'
  c.data.seq_len = 1024
  c.data.batch_size = 512
  c.lock()
  return c
