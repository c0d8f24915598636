"""Sharded training wrappers: FSDP (fully_shard per block, 2 CPU processes over gloo) gives the unsharded outputs,
attention-guided compression included (its scoring must run inside the block's gathered call)."""

import os
import socket

import torch
import torch.distributed as dist
from tiny_models import VIDEO_TOKEN_ID, open_transfer_gates, tiny_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sharded_forward(rank, world_size, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from torch.distributed.fsdp import fully_shard

        torch.set_num_threads(1)
        model = tiny_model(token_compression="uni_1_0.5-attn_2_0.25")
        open_transfer_gates(model, 0.5)
        ids = torch.tensor([[5, 6] + [VIDEO_TOKEN_ID] * 12 + [7, 8, 9]])
        pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = model(input_ids=ids, pixel_values_videos=pixels).logits
        for layer in model.model.language_model.layers:
            fully_shard(layer)
        fully_shard(model)
        with torch.no_grad():
            actual = model(input_ids=ids, pixel_values_videos=pixels).logits
        results[rank] = float((actual - expected).abs().max())
    finally:
        dist.destroy_process_group()


def test_fsdp_sharded_model_with_attention_compression_matches_unsharded():
    manager = torch.multiprocessing.Manager()
    results = manager.dict()
    torch.multiprocessing.spawn(sharded_forward, args=(2, free_port(), results), nprocs=2)
    assert dict(results) == {0: 0.0, 1: 0.0}
