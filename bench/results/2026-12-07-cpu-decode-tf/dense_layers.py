"""Quest decode with the layers whose attention is most spread kept dense at decode: does agreement rise?"""
import json, sys, time
import torch
from attnzoo.eval.decode_agreement import decode_agreement, text_prompts
from attnzoo.models import load_model

def quest(budget, dense_layers):
    sel = {"name": "quest", "page_size": 16, "budget": budget}
    part = {"op": "dense", "decode": {"selector": sel, "op": "block_sparse"}}
    layers = {str(i): {"op": "dense"} for i in dense_layers}
    return {"name": f"quest-{budget}", "default": part, "layers": layers}

torch.manual_seed(0)
model, tok = load_model("embedded")
prompts = text_prompts(tok, 2048, 8)
weak = [0, 1, 2, 8, 23]
spread = list(range(0, 11))
stacks = {"quest-512 dense 0,1,2,8,23": quest(512, weak), "quest-256 dense 0,1,2,8,23": quest(256, weak),
          "quest-512 dense 0-10": quest(512, spread), "quest-256 dense 0-10": quest(256, spread)}
t = time.time()
out = decode_agreement(model, prompts, stacks, new_tokens=32)
print(json.dumps(out, indent=1)); print("seconds", time.time() - t)
