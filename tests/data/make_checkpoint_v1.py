"""How tests/data/checkpoint-v1 was written: by the release before spec grammar version 2 (commit
7961572, checkpoint format version 1, where ``int3-g32`` meant the narrow grid -3..3).

    git worktree add /tmp/old 7961572 && pip install --no-deps --target /tmp/oldsite /tmp/old
    PYTHONPATH=/tmp/oldsite python tests/data/make_checkpoint_v1.py tests/data/checkpoint-v1

tests/models/test_checkpoint.py loads it with today's code and checks it keeps that meaning."""

import sys

import jax

from cascade import quant
from cascade.models import llama
from cascade.models.checkpoint import FORMAT_VERSION, save_checkpoint
from cascade.models.config import ModelConfig
from cascade.models.model import Model

assert FORMAT_VERSION == 1, "run this with the release before spec grammar version 2"
CFG = ModelConfig(vocab_size=64, dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16)
RULES = "attn=int4,mlp=int2-g16,lm_head=int3-g32"  # every symmetric width whose default grid changed
params = llama.init_params(CFG, jax.random.key(0))
qp, _ = quant.quantize_params(params, RULES, progress=False)
save_checkpoint(sys.argv[1], Model(config=CFG, params=qp, quant=RULES, source="make_checkpoint_v1.py", format="hf"))
