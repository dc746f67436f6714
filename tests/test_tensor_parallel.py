"""Tensor parallelism on CPU: two gloo processes, transformers' ``tp_plan="auto"`` shards a tiny
random Llama by heads, and ``attnzoo.patch`` must give the logits of the same stack on one
process (each rank sees its local heads; routers map them to global heads; the density meter
averages over ranks)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 2, 8, 4, 16
SMALL = {"block_size": 16}
STACKS = {
    "full": {"name": "full", "default": {"op": "dense"}},
    "streaming": {"name": "s", "default": {"selector": {"name": "streaming", "sink": 16, "local": 32, **SMALL},
                                            "op": "block_sparse"}},
    "xattention": {"name": "x", "default": {"selector": {"name": "xattention", "stride": 4, "chunk_size": 64,
                                                         "threshold": 0.8, **SMALL}, "op": "block_sparse"}},
    "table": {"name": "t", "default": {
        "router": {"name": "table", "heads": {0: ["full", "sparse", "sparse", "full"],
                                              1: ["sparse", "full", "full", "sparse"]}},
        "branches": {"full": {"op": "dense"},
                     "sparse": {"selector": {"name": "streaming", "sink": 16, "local": 32, **SMALL},
                                "op": "block_sparse"}}}},
    "elastic": {"name": "e", "default": {
        # seed 3: random MLPs that route some heads to each branch (the comparison then covers both)
        "router": {"name": "elastic", "head_dim": HEAD_DIM, "pool_tokens": 16, "seed": 3, "full": "full",
                   "sparse": "sparse"},
        "branches": {"full": {"op": "dense"},
                     "sparse": {"selector": {"name": "streaming", "sink": 16, "local": 32, **SMALL},
                                "op": "block_sparse"}}}},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, path, out):
    import warnings

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import attnzoo
    from attnzoo.stack import DensityMeter

    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tp_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, tp_plan="auto").eval()
        ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(1))
        res = {}
        for name, cfg in STACKS.items():
            meters = DensityMeter(), DensityMeter()
            with torch.no_grad():
                with attnzoo.patch(ref_model, cfg, meter=meters[0]):
                    ref = ref_model(ids).logits
                    d_ref = meters[0].mean()
                    ref_tokens = ref_model.generate(ids, max_new_tokens=6, do_sample=False)
                with attnzoo.patch(tp_model, cfg, meter=meters[1]):
                    got = tp_model(ids).logits
                    d_tp = meters[1].mean()
                    tp_tokens = tp_model.generate(ids, max_new_tokens=6, do_sample=False)
            res[name] = (float((got - ref).abs().max()), d_ref, d_tp, bool(torch.equal(ref_tokens, tp_tokens)))
        table = {"name": "table", "heads": {0: ["full", "sparse"]}, "default": "full"}
        bad = {"name": "bad", "default": {"router": table, "branches": STACKS["table"]["default"]["branches"]}}
        try:
            with torch.no_grad(), attnzoo.patch(tp_model, bad):
                tp_model(ids)
            res["bad"] = "no error"
        except ValueError as e:
            res["bad"] = str(e)
        if rank == 0:
            out.update(res)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tp") / "llama"
    cfg = LlamaConfig(vocab_size=128, hidden_size=HEADS * HEAD_DIM, intermediate_size=256, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def test_tensor_parallel_patch_matches_one_process(tiny_llama):
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), tiny_llama, out), nprocs=2, join=True)
    print({k: out[k] for k in out.keys()})
    for name in STACKS:
        err, d_ref, d_tp, same_tokens = out[name]
        assert err <= 1e-4, (name, err)
        assert same_tokens, f"{name}: greedy tokens differ between one process and two TP ranks"
        assert abs(d_ref - d_tp) <= 1e-6, (name, d_ref, d_tp)  # the meter averages over both ranks
    assert out["streaming"][1] < 1.0 and out["table"][1] < out["full"][1] and out["elastic"][1] < 1.0
    assert "lists 2 heads, the layer has 4 KV heads (2 on each of 2 tensor-parallel ranks)" in out["bad"]
