"""OpenWebText, the reference small model and hyperparameters of method.md §9.1.

Prepare the data once (local jsonl/parquet/txt of OpenWebText documents), then train:
  python -m prime_jax.data.text prepare --input /data/openwebtext --output /data/owt_1024
  python -m prime_jax.main --config configs/owt.py:ell=4 --workdir gs://bucket/owt_l4 \
      --config.data.data_dir=/data/owt_1024
The authors' objective is the default (reproduction); every PPL printed comes from the valid bound.
"""

from configs import base


def get_config(arg: str = ''):
  c = base.get_config()
  kv = base.parse_arg(arg, ell=4, objective='paper', carry_over=True)
  c.diffusion.ell = kv['ell']
  c.diffusion.objective = kv['objective']
  c.diffusion.carry_over = kv['carry_over']
  c.model.dtype = 'bfloat16'
  c.data.source = 'owt'
  c.data.seq_len = 1024
  c.data.batch_size = 512
  c.lock()
  return c
