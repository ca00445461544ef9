"""Sequence parallelism (pipelines/parallel.py): the pure layout functions against hand-worked tensors, the family
checks, the config refusals, the vision tower's frame split against a whole encode, and the collectives on 2 gloo
ranks (a few seconds). The model-level equality with one rank (both families, DDP and ZeRO-3) and the CLI runs are in
the slow tests/test_sequence_parallel.py."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from pipelines import parallel as P


# ---------------------------------------------------------------------------------------------------------------------
# Pure functions
def test_right_padding_moves_real_tokens_first_in_order():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 1, 1, 0, 1, 0]])
    ids = torch.tensor([[9, 9, 1, 2, 3, 4], [5, 6, 7, 8, 9, 9], [9, 1, 2, 9, 3, 9]])
    order = P.right_padding_order(mask)
    got = P.apply_order(ids, order, 8, pad_value=0)
    assert got.tolist() == [[1, 2, 3, 4, 9, 9, 0, 0], [5, 6, 7, 8, 9, 9, 0, 0], [1, 2, 3, 9, 9, 9, 0, 0]]
    assert P.apply_order(mask, order, 8, 0).tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0],
                                                         [1, 1, 1, 0, 0, 0, 0, 0]]


def test_to_right_padding_moves_every_row_tensor_and_refuses_unknown_ones():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    batch = {"input_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]), "attention_mask": mask,
             "mm_token_type_ids": torch.tensor([[0, 2, 0], [0, 0, 1]]), "labels": torch.tensor([[-100, 5, 6],
                                                                                                [7, 8, 9]]),
             "pixel_values": torch.ones(3, 4), "video_grid_thw": torch.tensor([[1, 2, 2]])}
    out, order, length = P.to_right_padding(batch, sp=2, pad_token_id=0)
    assert length == 4 and order.tolist() == [[1, 2, 0], [0, 1, 2]]
    assert out["input_ids"].tolist() == [[5, 6, 0, 0], [7, 8, 9, 0]]
    assert out["mm_token_type_ids"].tolist() == [[2, 0, 0, 0], [0, 0, 1, 0]]
    assert out["labels"].tolist() == [[5, 6, -100, -100], [7, 8, 9, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    assert out["pixel_values"] is batch["pixel_values"]  # per item, not per token
    with pytest.raises(ValueError, match="no padding rule"):
        P.to_right_padding({**batch, "token_weights": torch.ones(2, 3)}, sp=2, pad_token_id=0)


def test_lengths_and_shards():
    assert [P.padded_length(n, 2) for n in (1, 2, 7, 8)] == [2, 2, 8, 8]
    assert P.padded_length(10, 4) == 12
    assert [P.shard_bounds(12, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    with pytest.raises(ValueError):
        P.shard_bounds(7, 2, 0)


def test_positions_get_a_text_row_and_three_row_positions_raise():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert P.text_positions(mask).tolist() == [[0, 1, 2, 0], [0, 1, 0, 0]]
    rope = torch.arange(24).view(3, 2, 4)
    four = P.with_text_row(rope, mask)
    assert four.shape == (4, 2, 4) and torch.equal(four[1:], rope) and four[0].tolist() == [[0, 1, 2, 0],
                                                                                            [0, 1, 0, 0]]
    assert torch.equal(P.split_positions(four, 2, 4), four[..., 2:4])
    with pytest.raises(ValueError, match="4 x B x L"):
        P.split_positions(rope, 0, 2)  # the trap: Qwen-VL text layers pass no positions to attention from 3 rows
    assert P.with_text_row(None, mask).shape == (4, 2, 4)


def test_targets_are_shifted_before_the_split():
    labels = torch.tensor([[-100, -100, 5, 6, 7, -100]])
    t = P.shifted(labels, -100)
    assert t.tolist() == [[-100, 5, 6, 7, -100, -100]]
    # shard 0 is [0, 3): its last position predicts token 6, which lives in shard 1
    a, b = P.shard_bounds(6, 2, 0)
    assert t[0, a:b].tolist() == [-100, 5, 6]


def test_deepstack_index_for_several_rows():
    m = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    # row-major visual tokens: r0 -> 0,1,2 ; r1 -> 3,4,5 ; shard [2, 5) holds r0 cols 2,4 (1, 2), r1 cols 3,4 (4, 5)
    assert P.deepstack_index(m, 2, 5).tolist() == [1, 2, 4, 5]
    assert P.deepstack_index(m, 0, 2).tolist() == [0, 3]


def test_partition_units_is_contiguous_balanced_and_never_empty():
    assert P.partition_units([4, 4, 4, 4], 2) == [(0, 2), (2, 4)]
    assert P.partition_units([16, 1, 1, 1], 2) == [(0, 1), (1, 4)]
    assert P.partition_units([1, 1, 1, 16], 2) == [(0, 3), (3, 4)]
    parts = P.partition_units([1] * 7, 3)
    assert parts[0][0] == 0 and parts[-1][1] == 7 and all(a < b for a, b in parts)
    assert all(parts[i][1] == parts[i + 1][0] for i in range(2))
    with pytest.raises(ValueError):
        P.partition_units([1], 2)


def test_vision_shard_rows_grids_and_counts():
    # item 0: video t=3 of 2x2 patches (rows 0..11), item 1: image 1x2x2 (rows 12..15); merge 2 -> 1 token per patch
    grid = torch.tensor([[3, 2, 2], [1, 2, 2]])
    s0, s1 = (P.vision_shard(grid, 2, r, merge=2) for r in range(2))
    assert s0.grid.tolist() == [[2, 2, 2]] and s0.rows.tolist() == list(range(8))
    assert s1.grid.tolist() == [[1, 2, 2], [1, 2, 2]] and s1.rows.tolist() == list(range(8, 16))
    assert s0.merged_counts == s1.merged_counts == [2, 2]
    assert P.vision_shard(torch.tensor([[1, 4, 4]]), 2, 0, merge=2) is None  # one image: encoded whole everywhere


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_frame_split_equals_the_whole_encode(tmp_path, family):
    """The towers attend within one temporal patch (`Adapter.sp_shard_frames`): encoding each rank's share of the
    patches and concatenating equals one encode of everything (features and deepstack features)."""
    from pipelines.models.families import ADAPTERS
    from pipelines.models import load_model
    from pipelines.config import load_config

    adapter = ADAPTERS[family]
    d = adapter.build_tiny(tmp_path / family)
    model = load_model(load_config(overrides=[f"model.name_or_path={d}", "model.device=cpu",
                                              "model.dtype=float32"]).model)
    visual = adapter.vision_tower(model)
    c = visual.config
    width = 3 * c.temporal_patch_size * c.patch_size ** 2
    grid = torch.tensor([[3, 4, 6], [1, 4, 4], [2, 2, 4]])
    pixels = torch.randn(int(grid.prod(-1).sum()), width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = visual(pixels, grid_thw=grid)
        parts = [P.vision_shard(grid, 3, r, merge=c.spatial_merge_size) for r in range(3)]
        outs = [visual(pixels[s.rows], grid_thw=s.grid) for s in parts]
    assert [o.pooler_output.shape[0] for o in outs] == parts[0].merged_counts
    cat = torch.cat([o.pooler_output for o in outs])
    assert torch.allclose(cat, whole.pooler_output, atol=1e-5, rtol=0)
    for k, deep in enumerate(getattr(whole, "deepstack_features", None) or []):
        assert torch.allclose(torch.cat([o.deepstack_features[k] for o in outs]), deep, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Family checks and configuration
def test_sp_check_names_what_cannot_be_split():
    from types import SimpleNamespace

    from pipelines.models.families import ADAPTERS, SequenceParallelError

    ok = SimpleNamespace(num_attention_heads=28, num_key_value_heads=4, layer_types=["full_attention"] * 2)
    ADAPTERS["qwen2_5_vl"].sp_check(ok, 2)
    ADAPTERS["qwen2_5_vl"].sp_check(ok, 4)
    ADAPTERS["qwen2_5_vl"].sp_check(ok, 1)
    with pytest.raises(SequenceParallelError, match="28 attention heads / 4 KV heads"):
        ADAPTERS["qwen2_5_vl"].sp_check(ok, 3)
    ADAPTERS["qwen2_5_vl"].sp_check(SimpleNamespace(num_attention_heads=16, num_key_value_heads=4,
                                                    layer_types=None), 8)  # 8 ranks, 4 KV heads: replicated
    with pytest.raises(SequenceParallelError, match="cannot be split"):
        ADAPTERS["qwen2_5_vl"].sp_check(SimpleNamespace(num_attention_heads=12, num_key_value_heads=3,
                                                        layer_types=None), 2)
    hybrid = SimpleNamespace(num_attention_heads=16, num_key_value_heads=2,
                             layer_types=["linear_attention", "full_attention"])
    with pytest.raises(SequenceParallelError, match="linear-attention"):
        ADAPTERS["qwen3_5"].sp_check(hybrid, 2)
    with pytest.raises(SequenceParallelError, match="visual_pos_masks"):
        ADAPTERS["qwen2_5_vl"].sp_shard_language_kwargs({"visual_pos_masks": torch.ones(1, 2)}, 0, 1)


def test_config_refuses_a_group_that_does_not_divide_the_processes():
    from pipelines.config import ConfigError, load_config

    assert load_config(overrides=["distributed.nproc=4", "distributed.sequence_parallel=2"]
                       ).distributed.sequence_parallel == 2
    with pytest.raises(ConfigError, match="sequence_parallel"):
        load_config(overrides=["distributed.sequence_parallel=2"])
    with pytest.raises(ConfigError, match="must divide"):
        load_config(overrides=["distributed.nproc=3", "distributed.sequence_parallel=2"])


def test_cli_refuses_in_one_line(tiny_model_dir):
    from conftest import run_cli

    r = run_cli("train", "sft", "--model", tiny_model_dir, "--set", "distributed.sequence_parallel=2", check=False)
    assert r.exit_code != 0
    assert "sequence_parallel" in r.output and "Traceback" not in r.output


def test_gather_leaders_counts_a_group_once_and_cuts_the_remainder():
    from types import SimpleNamespace

    class Acc:  # 4 ranks = 2 groups of 2: ranks 0, 1 hold batch a; ranks 2, 3 hold batch b
        gradient_state = SimpleNamespace(end_of_dataloader=False, remainder=-1)

        def gather(self, t):
            return torch.cat([t, t, t + 10, t + 10])

    acc, topo = Acc(), P.Topology(size=2, rank=1, world=4, global_rank=1)
    t = torch.tensor([1.0, 2.0])
    assert P.gather_leaders(acc, topo, t).tolist() == [1.0, 2.0, 11.0, 12.0]
    acc.gradient_state = SimpleNamespace(end_of_dataloader=True, remainder=3)  # the last batch holds 3 real samples
    assert P.gather_leaders(acc, topo, t).tolist() == [1.0, 2.0, 11.0]


def test_topology_of_one_process():
    t = P.setup(1)
    assert (t.size, t.rank, t.dp_size, t.dp_rank, t.leader, t.enabled) == (1, 0, 1, 0, True, False)
    t4 = P.Topology(size=2, rank=1, world=6, global_rank=3)
    assert (t4.dp_size, t4.dp_rank, t4.leader) == (3, 1, False)


# ---------------------------------------------------------------------------------------------------------------------
# Two gloo ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, model_dir: str, q) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=2)
        topo = P.setup(2)
        out = {"topo": (topo.size, topo.rank, topo.dp_size, topo.dp_rank)}
        # gather: uneven pieces, rank order, backward = the group's gradients summed, this rank's piece
        x = torch.full((1, 2 + rank, 3), float(rank + 1), requires_grad=True)
        y = P.gather(x, 1, topo.group, sizes=[2, 3])
        out["gather"] = y[0, :, 0].tolist()
        (y * torch.arange(5.0).view(1, 5, 1) * (rank + 1)).sum().backward()
        out["grad"] = x.grad[0, :, 0].tolist()
        out["broadcast"] = P.broadcast_object({"rank": rank}, topo)
        # SP forward on a tiny Qwen3-VL (2 heads, 1 KV head: Ulysses replicates the KV head), then a plain forward
        # on the same model: the attention key and num_key_value_groups are back to what generation needs.
        from pipelines.config import load_config
        from pipelines.models import load_model
        from pipelines.rl import rollout as R

        cfg = load_config(overrides=[f"model.name_or_path={model_dir}", "model.device=cpu", "model.dtype=float32",
                                     "model.attn_implementation=sdpa"])
        model = load_model(cfg.model, for_training=True)
        fresh = load_model(cfg.model, for_training=False)
        sp = P.install(model, topo)
        ids = torch.tensor([[11, 12, 13, 14, 15, 16, 17], [0, 0, 21, 22, 23, 24, 25]])
        mask = (ids != 0).long()
        comp = ids[:, -3:]
        inputs = {"input_ids": ids, "attention_mask": mask}
        lp_sp = R.completion_logprobs(model, inputs, comp)
        sp_attn = model.config.text_config._attn_implementation
        model.eval()
        with torch.no_grad():
            plain = model(input_ids=ids, attention_mask=mask).logits
            ref = fresh(input_ids=ids, attention_mask=mask).logits
            lp_ref = R.completion_logprobs(fresh, inputs, comp)
        attn = model.model.language_model.layers[0].self_attn
        out.update(lp_diff=float((lp_sp - lp_ref).abs().max()), plain_diff=float((plain - ref).abs().max()),
                   attn_after=model.config.text_config._attn_implementation, sp_attn=sp_attn,
                   kv_groups=attn.num_key_value_groups, counts=dict(sp.counts))
        q.put((rank, out))
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - reported to the test
        import traceback

        q.put((rank, {"error": f"{e}\n{traceback.format_exc()}"}))


def test_collectives_and_a_text_forward_on_two_gloo_ranks(tmp_path):
    pytest.importorskip("deepspeed")
    import torch.multiprocessing as mp

    from pipelines.models.families import ADAPTERS

    model_dir = str(ADAPTERS["qwen3_vl"].build_tiny(tmp_path / "q3"))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, model_dir, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    for r in range(2):
        assert "error" not in res[r], res[r]["error"]
    assert res[0]["topo"] == (2, 0, 1, 0) and res[1]["topo"] == (2, 1, 1, 0)
    assert res[0]["gather"] == res[1]["gather"] == [1.0, 1.0, 2.0, 2.0, 2.0]
    # d/dy of sum_r (r + 1) * y * position = 3 * position; rank 0 owns positions 0, 1 and rank 1 positions 2, 3, 4
    assert res[0]["grad"] == [0.0, 3.0] and res[1]["grad"] == [6.0, 9.0, 12.0]
    assert res[0]["broadcast"] == res[1]["broadcast"] == {"rank": 0}
    for r in range(2):
        assert res[r]["sp_attn"] == P.SP_ATTENTION  # the text model ran Ulysses ...
        assert res[r]["counts"]["attention"] == 2 and res[r]["counts"]["forwards"] == 1
        assert res[r]["lp_diff"] < 1e-5  # ... equal to one rank's forward (left padding moved to the right)
        assert res[r]["attn_after"] == "sdpa" and res[r]["kv_groups"] == 2  # ... and a plain forward is untouched
        assert res[r]["plain_diff"] < 1e-5


def test_rollout_logprobs_under_sp_take_the_sequence_parallel_path_and_the_sampler_rule(monkeypatch):
    """Under SP, rollout.completion_logprobs goes through parallel.completion_logprobs (inside the vision plan's
    context); engine log-probs are compared like for like only where the sampler is the plain temperature softmax
    (top_p 1, no logit bias): the shards' logits are never gathered, so a nucleus cannot be rebuilt."""
    from pipelines.errors import VideoR1Error
    from pipelines.rl import rollout as R

    calls = []
    logp = torch.tensor([[-0.5, -1.0]], requires_grad=True)
    monkeypatch.setattr(P, "enabled", lambda model: True)
    monkeypatch.setattr(P, "completion_logprobs", lambda m, i, c, t: calls.append((sorted(i), t)) or logp)
    inputs = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    comp = torch.zeros(1, 2, dtype=torch.long)
    assert R.completion_logprobs(object(), inputs, comp, temperature=0.7) is logp
    lp, sampler_lp = R.completion_logprobs(object(), inputs, comp, 0.7, sampler={"top_p": 1.0, "logit_bias": None})
    assert lp is logp and torch.equal(sampler_lp, logp) and not sampler_lp.requires_grad
    assert calls == [(["attention_mask", "input_ids"], 0.7)] * 2
    with pytest.raises(VideoR1Error, match="top_p=1"):
        R.completion_logprobs(object(), inputs, comp, 0.7, sampler={"top_p": 0.95, "logit_bias": None})
