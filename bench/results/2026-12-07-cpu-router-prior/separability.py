"""Do the Elastic router's inputs tell copy prompts from plain text? Pooled pre-RoPE keys (first and
last 100 tokens, per layer and KV head) of 12 held-out copy prompts and 12 plain-text windows at 1K;
leave-one-out nearest-centroid accuracy per layer. ``python separability.py`` (CPU, ~2 min)."""

import torch

from attnzoo.eval.copy import copy_suite
from attnzoo.integrations.hf import pre_rope_key_hooks
from attnzoo.models import load_model
from attnzoo.ops.head_router import pool_keys
from attnzoo.training.data import continuation_sample

model, tok = load_model("embedded", torch.float32, "cpu")
n, P = 1024, 12
copies = copy_suite(tok, [n], [0.1, 0.3, 0.5, 0.7, 0.9], 3, seed=300, offset=120_000)[:P]
texts = [continuation_sample(tok, n, 300 * 1000 + i, 120_000) for i in range(P)]
feats = {0: [], 1: []}
with torch.no_grad():
    for label, prompts in ((1, copies), (0, texts)):
        for p in prompts:
            with pre_rope_key_hooks(model) as keys:
                model(p.input_ids, use_cache=False, logits_to_keep=1)
                feats[label].append(torch.stack([pool_keys(keys[i], 100)[0] for i in sorted(keys)]))
X1, X0 = torch.stack(feats[1]), torch.stack(feats[0])  # [P, layers, Hkv, D]
accs = []
for layer in range(X1.shape[1]):
    a, b = X1[:, layer].flatten(1), X0[:, layer].flatten(1)
    correct = 0
    for i in range(P):
        for mine_all, other_all in ((a, b), (b, a)):
            mine = torch.cat([mine_all[:i], mine_all[i + 1:]]).mean(0)
            x = mine_all[i]
            correct += int((x - mine).norm() < (x - other_all.mean(0)).norm())
    accs.append(correct / (2 * P))
print("nearest-centroid LOO accuracy per layer:", [round(x, 2) for x in accs])
print("mean", sum(accs) / len(accs))
