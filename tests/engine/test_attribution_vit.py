"""Vision-transformer methods (generic attention, TAM) against a hand-written forward of a tiny ViT."""

from __future__ import annotations

import pytest
import torch

from leapcore.attribution import attribute
from leapcore.attribution.vit import (
    generic_attention_relevance,
    head_weighted_relevance,
    rollout,
    transition_states,
)
from leapcore.errors import InputError
from tests.engine.test_attribution import SIZE, tiny_cnn

timm = pytest.importorskip("timm")
DEPTH = 3


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=16, depth=DEPTH, num_heads=2, num_classes=3
    ).eval()
    with torch.no_grad():  # sharper attention than the tiny init gives, so the layers differ
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
    return model


def hand_attention(vit, images: torch.Tensor, targets: list[int]):
    """Each block's attention and d logit[target] / d attention, by a forward written out here."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    attentions = []
    for block in vit.blocks:
        a = block.attn
        h = block.norm1(x)
        b, n, c = h.shape
        qkv = a.qkv(h).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attention = ((a.q_norm(q) * a.scale) @ a.k_norm(k).transpose(-2, -1)).softmax(-1)
        attentions.append(attention)
        out = a.proj(a.norm((attention @ v).transpose(1, 2).reshape(b, n, c)))
        x = x + block.ls1(out)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    logits = vit.forward_head(vit.norm(x))
    torch.testing.assert_close(logits, vit(images))  # the hand forward is the model's
    score = logits[torch.arange(len(targets)), targets].sum()
    gradients = torch.autograd.grad(score, attentions)
    return [a.detach() for a in attentions], [g.detach() for g in gradients]


def random_attention(layers: int, tokens: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(4)
    return [torch.randn(2, 3, tokens, tokens).mul(2).softmax(-1) for _ in range(layers)]


def test_generic_attention_under_uniform_gradients_is_rollout() -> None:
    """With every gradient 1, (grad * A)^+ = A and R = prod (I + A) = 2^L x rollout (whose steps
    are (A + I) / 2). Multiplying on the wrong side (R + R @ A) reverses the product and fails."""
    attentions = random_attention(3)
    ones = [torch.ones_like(a) for a in attentions]
    relevance = generic_attention_relevance(attentions, ones)
    torch.testing.assert_close(relevance, 8 * rollout(attentions), rtol=1e-5, atol=1e-6)
    wrong = torch.eye(5).expand(2, 5, 5)
    for a in attentions:
        wrong = wrong + wrong @ a.mean(1)
    assert not torch.allclose(wrong, 8 * rollout(attentions), rtol=1e-3)


def test_generic_attention_matches_the_hand_computed_relevance(vit) -> None:
    torch.manual_seed(1)
    images = torch.rand(2, 3, SIZE, SIZE)
    targets = [0, 2]
    result = attribute(vit, images, targets, ["generic_attention"], batch_size=2)
    attentions, gradients = hand_attention(vit, images, targets)
    relevance = torch.eye(17).expand(2, 17, 17)
    for a, g in zip(attentions, gradients):
        relevance = relevance + (g * a).clamp(min=0).mean(1) @ relevance
    expected = relevance[:, 0, 1:].reshape(2, 1, 4, 4)
    expected = torch.nn.functional.interpolate(expected, size=(SIZE, SIZE), mode="bilinear")[:, 0]
    torch.testing.assert_close(result.maps["generic_attention"], expected, rtol=1e-4, atol=1e-6)
    # The target is wired through, unlike rollout; perturbing the first block's attention moves it.
    other = attribute(vit, images, [1, 1], ["ga", "rollout"])
    assert not torch.allclose(other.maps["generic_attention"], result.maps["generic_attention"])
    with torch.no_grad():
        vit.blocks[0].attn.qkv.weight[:16] *= -1
    try:
        moved = attribute(vit, images, targets, ["generic_attention"]).maps["generic_attention"]
    finally:
        with torch.no_grad():
            vit.blocks[0].attn.qkv.weight[:16] *= -1
    before = result.maps["generic_attention"]
    assert (moved - before).abs().max() > 0.05 * before.abs().max()


def test_transition_states_carry_the_mass_of_a_markov_chain() -> None:
    """Row-stochastic steps keep the state's mass and the residual doubles it: 2^(chain steps).
    Without the residual it stays 1; with the transposed attention it is not a power of two."""
    attentions = random_attention(4)
    for start, steps in ((0, 3), (2, 1), (5, 0)):
        mass = transition_states(attentions, start).sum(-1)
        torch.testing.assert_close(mass, torch.full((2,), 2.0**steps))
    transposed = [a.transpose(-1, -2) for a in attentions]
    assert not torch.allclose(transition_states(transposed, 0).sum(-1), torch.full((2,), 8.0))


def test_transition_attention_matches_the_hand_computed_map(vit) -> None:
    torch.manual_seed(2)
    images = torch.rand(2, 3, SIZE, SIZE)
    targets = [1, 0]
    options = {"start_layer": 0, "steps": 5}
    result = attribute(vit, images, targets, ["tam"], transition_attention=options)
    attentions, _ = hand_attention(vit, images, targets)
    states = attentions[-1].mean(1)[:, :1]
    for a in reversed(attentions[:-1]):
        states = states @ a.mean(1) + states
    total = torch.zeros_like(attentions[-1])
    for alpha in torch.linspace(0, 1, 5):  # integrated gradient from the black image
        total += hand_attention(vit, alpha * images, targets)[1][-1]
    expected = states[:, 0] * (total / 5).clamp(min=0).mean(1)[:, 0]
    expected = expected[:, 1:].reshape(2, 1, 4, 4)
    expected = torch.nn.functional.interpolate(expected, size=(SIZE, SIZE), mode="bilinear")[:, 0]
    maps = result.maps["transition_attention"]
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-7)
    assert maps.abs().max() > 0
    plain = attribute(vit, images, targets, ["tam"], transition_attention={"with_integral": False})
    assert plain.maps["transition_attention"].min() >= 0
    assert all(b.attn.fused_attn == timm.layers.use_fused_attn() for b in vit.blocks)


def test_bidirectional_head_weights_keep_the_chain_stochastic_and_match_the_hand_map(vit) -> None:
    """Head importances sum to one, so each fused attention is row-stochastic and every row of R
    sums to 2^(blocks used); the map matches the formula on the hand-written forward."""
    attentions = random_attention(4)
    torch.manual_seed(6)
    gradients = [torch.randn_like(a) for a in attentions]
    for start, blocks in ((0, 4), (3, 1)):
        rows = head_weighted_relevance(attentions, gradients, start).sum(-1)
        torch.testing.assert_close(rows, torch.full_like(rows, 2.0**blocks))
    torch.manual_seed(7)
    images = torch.rand(2, 3, SIZE, SIZE)
    targets = [2, 1]
    options = {"start_layer": 1, "steps": 4}
    maps = attribute(vit, images, targets, ["bt"], bidirectional=options).maps["bidirectional"]
    attentions, gradients = hand_attention(vit, images, targets)
    relevance = torch.eye(17).expand(2, 17, 17)
    for a, g in list(zip(attentions, gradients))[1:]:
        heads = (a.transpose(-1, -2) @ g).abs().mean((-1, -2))
        heads = heads / heads.sum(1, keepdim=True)
        relevance = relevance + torch.einsum("bh,bhij->bij", heads, a) @ relevance
    total = sum(hand_attention(vit, t * images, targets)[1][-1] for t in torch.linspace(0, 1, 4))
    feedback = (total / 4).clamp(min=0).mean(1)
    expected = (relevance * feedback)[:, 0, 1:].reshape(2, 1, 4, 4)
    expected = torch.nn.functional.interpolate(expected, size=(SIZE, SIZE), mode="bilinear")[:, 0]
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-7)
    assert maps.abs().max() > 0


def test_vit_methods_refuse_models_without_attention_and_list_the_others() -> None:
    for method in ("generic_attention", "tam", "bidirectional"):
        with pytest.raises(InputError, match=r"has none\. Methods for models without attention "):
            attribute(tiny_cnn(), torch.rand(1, 3, SIZE, SIZE), 0, [method])
    with pytest.raises(InputError, match=r"integrated_gradients, .*saliency") as caught:
        attribute(tiny_cnn(), torch.rand(1, 3, SIZE, SIZE), 0, ["tam"])
    assert "attention_rollout" not in str(caught.value).split("Methods for")[1]
