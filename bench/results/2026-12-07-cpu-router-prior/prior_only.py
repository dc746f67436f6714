"""The prior stage alone: ``route_prior`` for STEPS steps (default 200) on 96 samples at 1K/2K (copy
share 1.0), then the full-attention share of its inference decisions on 8 held-out copy prompts and
8 plain-text windows at 2K. ``python prior_only.py [STEPS]`` (CPU, ~5 min)."""

import sys
import time

import torch

from attnzoo.eval.copy import copy_suite
from attnzoo.models import load_model
from attnzoo.training import route_prior, training_samples
from attnzoo.training.data import continuation_sample
from attnzoo.training.elastic import router_sparsity

model, tok = load_model("embedded", torch.float32, "cpu")
t = time.time()
samples = training_samples(tok, 96, lengths=(1024, 2048), seed=100, copy_share=1.0)
router = route_prior(model, samples, steps=int(sys.argv[1]) if len(sys.argv) > 1 else 200, batch=16, lr=2e-3)
print("prior", time.time() - t)
copies = copy_suite(tok, [2048], [0.1, 0.3, 0.5, 0.7, 0.9], 2, seed=300, offset=120_000)[:8]
texts = [continuation_sample(tok, 2048, 300 * 1000 + i, 120_000) for i in range(8)]
c = [1 - router_sparsity(model, router, p.input_ids) for p in copies]
x = [1 - router_sparsity(model, router, s.input_ids) for s in texts]
print("FA share copy", sum(c) / 8, "text", sum(x) / 8)
