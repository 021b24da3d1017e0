"""MAPS memory fusion (Eq. 1) and its augmentations (Table 5) and variants (Tables 7, 8)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from maps_tiny_model import tiny_cfg as shared_tiny_cfg

from maps.errors import ConfigError
from maps.memory.tokens import MemoryTokens
from maps.modeling.memory_fusion import (
    OBJECT,
    SCENE,
    MemoryCrossAttention,
    MemoryFusion,
    drop_memory,
    first_k_slots,
    sample_slots,
    tokens_of_slots,
    valid_slots,
)
from maps.modeling.transformer_decoder import build_transformer_decoder


def tiny_cfg(enabled: bool = True, **maps):
    return shared_tiny_cfg(enabled, **maps)


def build(cfg, seed: int = 0):
    torch.manual_seed(seed)
    return build_transformer_decoder(cfg, 16)


def inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(batch, 16, s, s, generator=g) for s in (2, 4, 8)]
    return x, torch.randn(batch, 16, 16, 16, generator=g)


def pool_memory(batch: int = 2, pool: int = 5, objects_per_slot: int = 2, seed: int = 2, query_cls=False):
    """Every image retrieves ``pool`` images, each with ``objects_per_slot`` object tokens."""
    g = torch.Generator().manual_seed(seed)
    per_image = []
    for _ in range(batch):
        m = {
            "scene": torch.randn(pool, 8, generator=g),
            "object": torch.randn(pool * objects_per_slot, 8, generator=g),
            "object_slot": torch.arange(pool).repeat_interleave(objects_per_slot),
        }
        if query_cls:
            m["query_cls"] = torch.randn(8, generator=g)
        per_image.append(m)
    return MemoryTokens.collate(per_image)


def count_calls(module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


# --- slot and drop functions -----------------------------------------------------------------
def test_valid_slots_and_tokens_of_slots():
    slots = torch.tensor([[0, 0, 2, -1], [1, -1, -1, -1]])
    assert valid_slots(slots, 3).tolist() == [[True, False, True], [False, True, False]]
    keep = torch.tensor([[False, False, True], [True, True, False]])
    assert tokens_of_slots(slots, keep).tolist() == [[False, False, True, False], [True, False, False, False]]


def test_first_k_slots_keeps_most_similar():
    valid = torch.tensor([[True, True, True, True], [False, True, True, True]])
    assert first_k_slots(valid, 2).tolist() == [[True, True, False, False], [False, True, False, False]]


def test_sample_slots_draws_k_distinct_valid_slots_uniformly():
    valid = torch.tensor([[True] * 5, [True, True, False, True, False], [True, False, False, False, False]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3, 5)
    for _ in range(3000):
        keep = sample_slots(valid, 2, g)
        assert not (keep & ~valid).any()
        assert keep.sum(1).tolist() == [2, 2, 1]  # image 3 has a single valid slot
        counts += keep.float()
    # uniform without replacement: each of P valid slots kept with probability k / P
    assert torch.allclose(counts[0] / 3000, torch.full((5,), 2 / 5), atol=0.04)
    assert torch.allclose(counts[1, [0, 1, 3]] / 3000, torch.full((3,), 2 / 3), atol=0.04)


def test_drop_memory_probability():
    assert not drop_memory(7, 0.0).any()
    assert drop_memory(7, 1.0).all()
    g = torch.Generator().manual_seed(0)
    rate = drop_memory(20000, 0.3, g).float().mean().item()
    assert abs(rate - 0.3) < 0.02
    a = drop_memory(50, 0.5, torch.Generator().manual_seed(5))
    b = drop_memory(50, 0.5, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


# --- Eq. 1 --------------------------------------------------------------------------------------
def test_memory_cross_attention_is_eq1_with_padding_excluded():
    torch.manual_seed(0)
    layer = MemoryCrossAttention(4, 1)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 1, 4)    # 3 queries, 1 image
    pos = torch.randn(3, 1, 4)
    mem = torch.randn(5, 1, 4)  # 5 tokens, the last two padding
    padding = torch.tensor([[False, False, False, True, True]])
    out = layer(x, mem, padding, pos)

    w_q, w_k, w_v = layer.multihead_attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = layer.multihead_attn.in_proj_bias.chunk(3)
    q = (x[:, 0] + pos[:, 0]) @ w_q.T + b_q
    k = mem[:3, 0] @ w_k.T + b_k
    v = mem[:3, 0] @ w_v.T + b_v
    attn = torch.softmax(q @ k.T / math.sqrt(4), dim=-1) @ v
    update = attn @ layer.multihead_attn.out_proj.weight.T + layer.multihead_attn.out_proj.bias
    expected = F.layer_norm(x[:, 0] + update, (4,), layer.norm.weight, layer.norm.bias)
    assert torch.allclose(out[:, 0], expected, atol=1e-5)

    # padding values do not matter
    other = mem.clone()
    other[3:] = 100.0
    assert torch.allclose(layer(x, other, padding, pos), out, atol=1e-6)


def test_row_without_valid_tokens_is_unchanged_and_finite():
    torch.manual_seed(0)
    for pre_norm in (False, True):
        layer = MemoryCrossAttention(8, 2, normalize_before=pre_norm)
        x = torch.randn(4, 3, 8, requires_grad=True)
        mem = torch.randn(6, 3, 8)
        padding = torch.zeros(3, 6, dtype=torch.bool)
        padding[1] = True        # image 1: nothing valid
        padding[2, 2:] = True    # image 2: two valid tokens
        out = layer(x, mem, padding)
        assert torch.isfinite(out).all()
        assert torch.equal(out[:, 1], x[:, 1])
        alone = layer(x[:, 2:], mem[:, 2:], padding[2:])  # other images do not interfere
        assert torch.allclose(out[:, 2:], alone, atol=1e-6)
        out.sum().backward()
        assert torch.isfinite(x.grad).all()
        assert torch.equal(layer(x, mem, torch.ones(3, 6, dtype=torch.bool)), x)
        assert torch.equal(layer(x, mem[:0], padding[:, :0]), x)  # no tokens at all


def test_fully_dropped_memory_keeps_parameters_in_the_training_graph():
    """DistributedDataParallel needs every parameter in the graph, even when Input- or
    Layer-Masking drops the memory of every image; the update must still be exactly zero."""
    torch.manual_seed(0)
    layer = MemoryCrossAttention(8, 2)
    x = torch.randn(4, 2, 8)
    for tokens in (6, 0):
        layer.zero_grad(set_to_none=True)
        out = layer.train()(x, torch.randn(tokens, 2, 8), torch.ones(2, tokens, dtype=torch.bool))
        assert torch.equal(out, x)
        (out * torch.randn_like(out)).sum().backward()
        for p in layer.parameters():
            assert p.grad is not None and not p.grad.any()


# --- placement, projections, variants ----------------------------------------------------------
def test_default_placement_and_calls_per_forward():
    decoder = build(tiny_cfg()).eval()
    fusion = decoder.memory_fusion
    assert fusion.layer_memory == {0: SCENE, 1: SCENE, 2: SCENE, 3: OBJECT, 4: OBJECT, 5: OBJECT}
    assert sorted(fusion.layers, key=int) == [str(i) for i in range(6)]  # none in layers 6-8
    scene_calls, object_calls = count_calls(fusion.scene_proj), count_calls(fusion.object_proj)
    layer_calls = {i: count_calls(layer) for i, layer in fusion.layers.items()}
    x, mask_features = inputs()
    decoder(x, mask_features, memory=pool_memory())
    assert len(scene_calls) == 1 and len(object_calls) == 1  # once per forward, not per layer
    assert all(len(calls) == 1 for calls in layer_calls.values())


def memory_tokens_seen_by_layer(decoder, layer: str, mem) -> tuple:
    """(number of tokens, padding mask) given to a memory layer in one forward."""
    seen = []
    decoder.memory_fusion.layers[layer].register_forward_pre_hook(
        lambda _m, args: seen.append((args[1].shape[0], args[2].clone()))
    )
    x, mask_features = inputs()
    decoder(x, mask_features, memory=mem)
    return seen[0]


def test_swapped_puts_object_memory_in_scene_layers():
    mem = pool_memory(pool=3, objects_per_slot=3)  # 3 scene tokens, 9 object tokens
    plain = build(tiny_cfg()).eval()
    swapped = build(tiny_cfg(SWAPPED=True)).eval()
    assert swapped.memory_fusion.layer_memory[0] == OBJECT
    assert swapped.memory_fusion.layer_memory[3] == SCENE
    assert memory_tokens_seen_by_layer(plain, "0", mem)[0] == 3
    assert memory_tokens_seen_by_layer(swapped, "0", mem)[0] == 9
    assert memory_tokens_seen_by_layer(swapped, "4", mem)[0] == 3


def test_num_retrieved_uses_first_k_slots():
    decoder = build(tiny_cfg(NUM_RETRIEVED=2))
    mem = pool_memory(pool=5, objects_per_slot=2)
    for mode in (False, True):  # inference and training without Random-Sampling
        prepared = decoder.memory_fusion.train(mode).prepare(mem)
        attended_scene = ~prepared[SCENE].padding
        attended_object = ~prepared[OBJECT].padding
        assert attended_scene.tolist() == [[True, True, False, False, False]] * 2
        assert attended_object.tolist() == [[True] * 4 + [False] * 6] * 2


def test_random_sampling_keeps_k_slots_and_their_objects():
    fusion = build(tiny_cfg(RANDOM_SAMPLING=True, POOL_SIZE=4, NUM_RETRIEVED=2)).memory_fusion.train()
    fusion.generator = torch.Generator().manual_seed(0)
    mem = pool_memory(batch=4, pool=5, objects_per_slot=2)
    draws = set()
    for _ in range(20):
        prepared = fusion.prepare(mem)
        scene_kept = ~prepared[SCENE].padding
        object_kept = ~prepared[OBJECT].padding
        assert scene_kept.sum(1).tolist() == [2] * 4
        assert not scene_kept[:, 4].any()  # slot 4 is outside the pool of 4
        # an object token is kept exactly when its retrieved image is
        assert torch.equal(object_kept, scene_kept.repeat_interleave(2, dim=1))
        draws.update(tuple(row) for row in scene_kept.tolist())
    assert len(draws) > 1  # a new draw per forward
    fusion.eval()  # inference: the first k, no randomness
    assert (~fusion.prepare(mem)[SCENE].padding).tolist() == [[True, True, False, False, False]] * 4


def test_pool_smaller_than_k_is_a_config_error():
    with pytest.raises(ConfigError, match="POOL_SIZE"):
        build(tiny_cfg(RANDOM_SAMPLING=True, POOL_SIZE=3, NUM_RETRIEVED=5))


def outputs_equal(a, b) -> bool:
    return torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_masks"], b["pred_masks"])


@pytest.mark.parametrize("key", ["INPUT_MASKING_PROB", "LAYER_MASKING_PROB"])
def test_masking_at_one_is_no_memory_and_at_zero_is_memory(key):
    x, mask_features = inputs()
    mem = pool_memory()
    no_memory = build(tiny_cfg(enabled=False)).train()(x, mask_features)
    with_memory = build(tiny_cfg()).train()(x, mask_features, memory=mem)
    assert not outputs_equal(no_memory, with_memory)
    assert outputs_equal(build(tiny_cfg(**{key: 1.0})).train()(x, mask_features, memory=mem), no_memory)
    assert outputs_equal(build(tiny_cfg(**{key: 0.0})).train()(x, mask_features, memory=mem), with_memory)


def record_dropped(seen: dict, name: str):
    """Pre-hook storing which images have no attended token in a memory layer."""

    def hook(_module, args):
        seen[name] = args[2].all(1)

    return hook


def test_input_masking_drops_per_image_once_per_forward():
    decoder = build(tiny_cfg(INPUT_MASKING_PROB=0.5)).train()
    decoder.memory_fusion.generator = torch.Generator().manual_seed(3)
    mem = pool_memory(batch=16)
    seen = {}
    for name, layer in decoder.memory_fusion.layers.items():
        layer.register_forward_pre_hook(record_dropped(seen, name))
    x, mask_features = inputs(batch=16)
    decoder(x, mask_features, memory=mem)
    dropped = seen["0"]
    assert 0 < int(dropped.sum()) < 16  # per image
    assert all(torch.equal(d, dropped) for d in seen.values())  # same images in every layer


def test_layer_masking_draws_per_layer():
    decoder = build(tiny_cfg(LAYER_MASKING_PROB=0.5)).train()
    decoder.memory_fusion.generator = torch.Generator().manual_seed(3)
    seen = {}
    for name, layer in decoder.memory_fusion.layers.items():
        layer.register_forward_pre_hook(record_dropped(seen, name))
    x, mask_features = inputs(batch=16)
    decoder(x, mask_features, memory=pool_memory(batch=16))
    patterns = {tuple(d.tolist()) for d in seen.values()}
    assert len(patterns) > 1
    assert all(0 < sum(p) < 16 for p in patterns)


def test_eval_mode_ignores_augmentations():
    x, mask_features = inputs()
    mem = pool_memory(pool=5)
    reference = build(tiny_cfg(NUM_RETRIEVED=3)).eval()(x, mask_features, memory=mem)
    augmented = build(tiny_cfg(
        NUM_RETRIEVED=3, RANDOM_SAMPLING=True, POOL_SIZE=5, INPUT_MASKING_PROB=1.0, LAYER_MASKING_PROB=1.0
    )).eval()
    assert outputs_equal(augmented(x, mask_features, memory=mem), reference)
    assert not outputs_equal(augmented.train()(x, mask_features, memory=mem), reference)


def test_append_query_cls_adds_an_attended_scene_token():
    decoder = build(tiny_cfg(APPEND_QUERY_CLS=True, NUM_RETRIEVED=2))
    mem = pool_memory(pool=5, query_cls=True)
    for mode in (False, True):
        prepared = decoder.memory_fusion.train(mode).prepare(mem)
        assert prepared[SCENE].tokens.shape[0] == 6
        assert (~prepared[SCENE].padding).tolist() == [[True, True, False, False, False, True]] * 2
        expected = decoder.memory_fusion.scene_proj(mem.query_cls)
        assert torch.allclose(prepared[SCENE].tokens[5], expected, atol=1e-6)
    with pytest.raises(ConfigError, match="query_cls"):
        decoder.memory_fusion.prepare(pool_memory(query_cls=False))


def test_test_time_switches_turn_a_memory_off_at_inference_only():
    decoder = build(tiny_cfg(TEST_SCENE_MEMORY=False))
    fusion = decoder.memory_fusion
    scene_proj_calls = count_calls(fusion.scene_proj)
    scene_layer_calls = count_calls(fusion.layers["0"])
    object_layer_calls = count_calls(fusion.layers["3"])
    x, mask_features = inputs()
    decoder.eval()(x, mask_features, memory=pool_memory())
    assert (len(scene_proj_calls), len(scene_layer_calls), len(object_layer_calls)) == (0, 0, 1)
    decoder.train()(x, mask_features, memory=pool_memory())
    assert (len(scene_proj_calls), len(scene_layer_calls), len(object_layer_calls)) == (1, 1, 2)
    # object memory only == scene memory fully padded
    both = build(tiny_cfg()).eval()
    mem = pool_memory()
    mem.scene_mask[:] = True
    assert outputs_equal(decoder.eval()(x, mask_features, memory=pool_memory()), both(x, mask_features, memory=mem))


def test_memory_width_mismatch_names_the_key():
    decoder = build(tiny_cfg())
    bad = MemoryTokens.collate([{"scene": torch.zeros(2, 7), "object": torch.zeros(1, 8), "object_slot": torch.zeros(1, dtype=torch.long)}])
    with pytest.raises(ConfigError, match="SCENE_MEMORY_DIM"):
        decoder.memory_fusion.prepare(bad)


@pytest.mark.parametrize(
    "maps, match",
    [
        ({"SCENE_LAYERS": [0, 1], "OBJECT_LAYERS": [1, 2]}, "share layers"),
        ({"OBJECT_LAYERS": [3, 9]}, "OBJECT_LAYERS"),
        ({"NUM_RETRIEVED": 0}, "NUM_RETRIEVED"),
        ({"LAYER_MASKING_PROB": 1.5}, "LAYER_MASKING_PROB"),
    ],
)
def test_invalid_memory_config_is_a_config_error(maps, match):
    with pytest.raises(ConfigError, match=match):
        MemoryFusion(tiny_cfg(**maps))


def test_only_placed_memories_get_a_projection():
    fusion = MemoryFusion(tiny_cfg(OBJECT_LAYERS=[]))
    assert fusion.object_proj is None and fusion.scene_proj is not None
    assert sorted(fusion.layers, key=int) == ["0", "1", "2"]


def test_memory_cross_attention_pre_norm_is_eq1_on_the_normalised_queries():
    """PRE_NORM (Mask2Former's ``forward_pre``): LayerNorm on the queries before f_Q, the
    residual added to the un-normalised queries, no LayerNorm after; memory is not normalised."""
    torch.manual_seed(0)
    layer = MemoryCrossAttention(4, 1, normalize_before=True)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 1, 4) * 3 + 1  # far from unit norm, so a missing or extra LN shows
    pos = torch.randn(3, 1, 4)
    mem = torch.randn(5, 1, 4) * 2
    padding = torch.tensor([[False, False, False, True, True]])
    out = layer(x, mem, padding, pos)

    w_q, w_k, w_v = layer.multihead_attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = layer.multihead_attn.in_proj_bias.chunk(3)
    normed = F.layer_norm(x[:, 0], (4,), layer.norm.weight, layer.norm.bias)
    q = (normed + pos[:, 0]) @ w_q.T + b_q
    k = mem[:3, 0] @ w_k.T + b_k
    v = mem[:3, 0] @ w_v.T + b_v
    attn = torch.softmax(q @ k.T / math.sqrt(4), dim=-1) @ v
    update = attn @ layer.multihead_attn.out_proj.weight.T + layer.multihead_attn.out_proj.bias
    expected = x[:, 0] + update
    assert torch.allclose(out[:, 0], expected, atol=1e-5)
    # the post-norm reading of the same layer is a different function
    post = F.layer_norm(x[:, 0] + update, (4,), layer.norm.weight, layer.norm.bias)
    assert not torch.allclose(out[:, 0], post, atol=1e-2)


def test_input_masking_also_drops_the_appended_query_cls():
    """MAPS-Aug-CLS with Input-Masking (docs/fidelity.md): "the cross-attention is randomly
    masked once at the beginning of the forward pass" (section 4.5) and the image's own CLS
    token is part of the scene memory (section 4.4), so an input-masked image attends to
    nothing, its own CLS included: exactly Mask2Former's update for that image."""
    mem = pool_memory(pool=5, query_cls=True)
    x, mask_features = inputs()
    fusion = build(tiny_cfg(APPEND_QUERY_CLS=True, INPUT_MASKING_PROB=1.0)).memory_fusion.train()
    prepared = fusion.prepare(mem)
    assert prepared[SCENE].padding.all() and prepared[OBJECT].padding.all()
    kept = build(tiny_cfg(APPEND_QUERY_CLS=True, INPUT_MASKING_PROB=0.0)).memory_fusion.train()
    assert not kept.prepare(mem)[SCENE].padding[:, -1].any()  # the CLS slot, when not masked
    no_memory = build(tiny_cfg(enabled=False)).train()(x, mask_features)
    masked = build(tiny_cfg(APPEND_QUERY_CLS=True, INPUT_MASKING_PROB=1.0)).train()
    assert outputs_equal(masked(x, mask_features, memory=mem), no_memory)


def test_memory_cross_attention_runs_after_the_masked_cross_attention():
    """'We place this cross-attention module within the Transformer decoder block' (Sec. 3.3):
    in each memory layer, masked cross-attention -> memory cross-attention -> self-attention
    -> FFN (docs/fidelity.md)."""
    decoder = build(tiny_cfg()).eval()
    order = []
    for i in (0, 3, 7):
        for name, module in (("masked", decoder.transformer_cross_attention_layers[i]),
                             ("self", decoder.transformer_self_attention_layers[i]),
                             ("ffn", decoder.transformer_ffn_layers[i])):
            module.register_forward_hook(lambda *_, n=name, i=i: order.append((i, n)))
        if str(i) in decoder.memory_fusion.layers:
            decoder.memory_fusion.layers[str(i)].register_forward_hook(
                lambda *_, i=i: order.append((i, "memory")))
    x, mask_features = inputs()
    decoder(x, mask_features, memory=pool_memory())
    assert order == [(0, "masked"), (0, "memory"), (0, "self"), (0, "ffn"),
                     (3, "masked"), (3, "memory"), (3, "self"), (3, "ffn"),
                     (7, "masked"), (7, "self"), (7, "ffn")]
