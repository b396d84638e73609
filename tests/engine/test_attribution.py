"""leapcore.attribution: reference properties that fail when a method is wired wrongly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from leapcore.adapter import LogitsModel
from leapcore.attribution import attribute, consensus, list_methods
from leapcore.attribution.vit import VIT_METHODS
from leapcore.errors import InputError
from leapcore.models import Normalize

pytest.importorskip("captum")
pytest.importorskip("zennit")
pytest.importorskip("crp")

SIZE = 16
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def tiny_cnn(seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU x 2, average pool, linear; no biases anywhere once the batch norms are merged.

    Each batch norm's shift is chosen to cancel its mean, so the canonized network is bias-free and
    LRP's input relevance must sum exactly (up to the stabilisers) to the target logit.
    """
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4, bias=False),
    )
    for bn in (model[1], model[4]):
        n = bn.num_features
        bn.running_mean.copy_(torch.randn(n) * 0.3)
        bn.running_var.copy_(torch.rand(n) + 0.5)
        signs = torch.tensor([1.0, -1.0]).repeat(
            n // 2
        )  # mixed signs: LRP's rules see the difference
        bn.weight.data.copy_((torch.rand(n) + 0.5) * signs)
        bn.bias.data.copy_(bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps))
    return model.eval()


def folded(model: nn.Module) -> nn.Module:
    """The same network with each batch norm folded into its convolution by hand (no BN left)."""
    out = copy.deepcopy(model)
    for conv_i, bn_i in ((0, 1), (3, 4)):
        conv, bn = out[conv_i], out[bn_i]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.data *= scale.view(-1, 1, 1, 1)
        out[bn_i] = nn.Identity()
    return out


@pytest.fixture()
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(3, 3, SIZE, SIZE)


def adapter(model: nn.Module) -> LogitsModel:
    return LogitsModel(model, 4, [Normalize(MEAN, STD)], (3, SIZE, SIZE), False, False)


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return adapter(model)(x)


SMALL = {
    "occlusion": {"window": 4, "stride": 4},
    "lime": {"n_samples": 24, "patch": 4},
    "kernel_shap": {"n_samples": 24, "patch": 4},
    "smoothgrad": {"nt_samples": 4},
    "gradient_shap": {"n_samples": 4},
    "integrated_gradients": {"n_steps": 8},
    "crp": {"top_k": 2},
    "internal_influence": {"resolution": 4},
}


def test_every_cnn_method_gives_a_signed_map_per_image_and_target(images) -> None:
    methods = [m for m in list_methods() if m not in VIT_METHODS]
    options = {k: v for k, v in SMALL.items() if k in methods}
    result = attribute(
        tiny_cnn(), images, [[0, 1], [2], [3]], methods,
        preprocessing=[Normalize(MEAN, STD)], layer="3", batch_size=2, **options,
    )  # fmt: skip
    assert result.targets.tolist() == [0, 1, 2, 3]
    assert result.image_index.tolist() == [0, 0, 1, 2]
    for name in methods:
        maps = result.maps[name]
        assert maps.shape == (4, SIZE, SIZE), name
        assert torch.isfinite(maps).all() and maps.abs().sum() > 0, name
        assert result.seconds[name] > 0
    assert result.extras["crp"]["concept_maps"].shape == (4, 2, SIZE, SIZE)
    # Different targets of one image give different maps (the target is wired through).
    assert not torch.allclose(result.map("saliency", 0, 0), result.map("saliency", 0, 1))


def test_integrated_gradients_completeness_and_a_broken_variant_fails(images) -> None:
    model = tiny_cnn()
    targets = [0, 1, 2]
    result = attribute(
        model, images, targets, ["ig", "saliency"], preprocessing=[Normalize(MEAN, STD)],
        integrated_gradients={"n_steps": 128},
    )  # fmt: skip
    gap = logits_of(model, images) - logits_of(model, torch.zeros_like(images))
    expected = gap[torch.arange(3), targets]
    ig_sum = result.maps["integrated_gradients"].sum(dim=(1, 2))
    torch.testing.assert_close(ig_sum, expected, atol=2e-3, rtol=1e-2)
    # IG wired without the (x - baseline) factor is the path-averaged gradient; at the point it is
    # the saliency map, which misses completeness by far more than the tolerance above.
    wrong = result.maps["saliency"].sum(dim=(1, 2))
    assert ((wrong - expected).abs() > 0.05 * expected.abs() + 1e-2).any()


@pytest.mark.parametrize(
    "method", ["lrp_epsilon_plus_flat", "lrp_epsilon_gamma_box", "lrp_epsilon_alpha2_beta1"]
)
def test_lrp_conserves_the_target_logit_through_the_canonized_model(images, method) -> None:
    model = tiny_cnn()
    targets = [0, 1, 3]
    result = attribute(model, images, targets, [method], preprocessing=[Normalize(MEAN, STD)])
    logit = logits_of(model, images)[torch.arange(3), targets]
    torch.testing.assert_close(result.maps[method].sum(dim=(1, 2)), logit, rtol=1e-3, atol=1e-4)


def test_lrp_of_the_canonized_model_equals_lrp_of_the_folded_network(images, monkeypatch) -> None:
    model = tiny_cnn()
    options = {"preprocessing": [Normalize(MEAN, STD)]}
    ours = attribute(model, images, [0, 1, 2], ["lrp"], **options).maps["lrp_epsilon_plus_flat"]
    plain = attribute(folded(model), images, [0, 1, 2], ["lrp"], **options)
    torch.testing.assert_close(ours, plain.maps["lrp_epsilon_plus_flat"], rtol=1e-3, atol=1e-5)
    # Broken variant: no canonizer, the batch norms pass relevance through unchanged.
    from leapcore.attribution import lrp

    monkeypatch.setattr(lrp, "canonizers_for", lambda network: [])
    broken = attribute(model, images, [0, 1, 2], ["lrp"], **options).maps["lrp_epsilon_plus_flat"]
    assert not torch.allclose(broken, plain.maps["lrp_epsilon_plus_flat"], rtol=1e-3, atol=1e-5)


def test_crp_concept_heatmaps_sum_to_the_class_heatmap(images) -> None:
    model = tiny_cnn()
    result = attribute(
        model, images, [0, 2, 3], ["crp", "lrp"], preprocessing=[Normalize(MEAN, STD)],
        crp={"layer": "3", "top_k": 6},
    )  # fmt: skip
    extras = result.extras["crp"]
    assert sorted(extras["concept_ids"][0].tolist()) == list(range(6))  # all channels of layer 3
    concept_sum = extras["concept_maps"].sum(dim=1)
    torch.testing.assert_close(concept_sum, result.maps["crp"], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(
        result.maps["crp"], result.maps["lrp_epsilon_plus_flat"], rtol=1e-3, atol=1e-5
    )
    # Concept relevances are sorted and add up to the logit (conservation at the layer).
    relevance = extras["concept_relevance"]
    assert (relevance[:, :-1] >= relevance[:, 1:]).all()
    logit = logits_of(model, images)[torch.arange(3), [0, 2, 3]]
    torch.testing.assert_close(relevance.sum(1), logit, rtol=1e-3, atol=1e-4)


def test_consensus_of_identical_models_is_each_models_map(images) -> None:
    model = tiny_cnn()
    twins = [model, copy.deepcopy(model), copy.deepcopy(model)]
    options = {"preprocessing": [Normalize(MEAN, STD)]}
    result = consensus(twins, images, [0, 1, 2], "ig", **options)
    for each in result.per_model:
        torch.testing.assert_close(result.consensus, each, rtol=1e-5, atol=1e-6)
    assert result.consensus.abs().flatten(1).amax(1).allclose(torch.ones(3))
    other = consensus([model, tiny_cnn(seed=5)], images, [0, 1, 2], "ig", **options)
    assert not torch.allclose(other.consensus, other.per_model[0], atol=1e-3)


def test_internal_influence_at_the_input_cut_is_input_attribution(images) -> None:
    options = {"preprocessing": [Normalize(MEAN, STD)]}
    result = attribute(
        tiny_cnn(), images, [0, 1, 2], ["internal_influence", "ig"],
        internal_influence={"resolution": 12}, integrated_gradients={"n_steps": 12, "method": "riemann_middle"},
        **options,
    )  # fmt: skip
    torch.testing.assert_close(
        result.maps["internal_influence"], result.maps["integrated_gradients"], rtol=1e-4, atol=1e-6
    )
    point = attribute(
        tiny_cnn(), images, [0, 1, 2], ["internal_influence", "saliency"],
        internal_influence={"doi": "point", "multiply_activation": False}, **options,
    )  # fmt: skip
    torch.testing.assert_close(
        point.maps["internal_influence"], point.maps["saliency"], rtol=1e-5, atol=1e-7
    )


def test_internal_influence_at_a_layer_cut_is_complete_for_its_quantity(images) -> None:
    model = tiny_cnn()
    targets = [0, 1, 2]
    result = attribute(
        model, images, targets, ["influence"], preprocessing=[Normalize(MEAN, STD)],
        internal_influence={"layer": "5", "resolution": 64, "qoi": "comparative", "contrast": 3},
    )  # fmt: skip
    logits = logits_of(model, images)
    # Zero activations after the last ReLU give zero logits (no biases): the units' influence adds
    # up to logit[target] - logit[3].
    expected = logits[torch.arange(3), targets] - logits[:, 3]
    per_unit = result.extras["internal_influence"]["unit_influence"]
    torch.testing.assert_close(per_unit.sum(1), expected, rtol=1e-3, atol=1e-4)


def test_attention_rollout_on_a_tiny_vit() -> None:
    timm = pytest.importorskip("timm")
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3
    ).eval()
    images = torch.rand(2, 3, 16, 16)
    result = attribute(vit, images, [0, 1], ["rollout", "saliency"])
    maps = result.maps["attention_rollout"]
    assert maps.shape == (2, 16, 16) and (maps >= 0).all()
    # Zero query/key weights make every attention row uniform (U, idempotent): two layers of
    # (U + I) / 2 roll out to I / 4 + 3 U / 4, so the class token gives each of the 17 tokens 0.75 / 17.
    for block in vit.blocks:
        dim = block.attn.qkv.in_features
        block.attn.qkv.weight.data[: 2 * dim] = 0.0
        block.attn.qkv.bias.data[: 2 * dim] = 0.0
    uniform = attribute(vit, images, [0, 1], ["rollout"]).maps["attention_rollout"]
    torch.testing.assert_close(uniform, torch.full_like(uniform, 0.75 / 17), rtol=1e-5, atol=1e-7)
    assert all(getattr(b.attn, "fused_attn", True) == b.attn.fused_attn for b in vit.blocks)
    with pytest.raises(InputError, match="attention blocks; this model .Sequential. has none"):
        attribute(tiny_cnn(), torch.rand(1, 3, SIZE, SIZE), 0, ["rollout"])


def test_bad_input_gives_clear_errors(images) -> None:
    model = tiny_cnn()
    with pytest.raises(InputError, match=r"Did you mean 'integrated_gradients'.*Known methods: "):
        attribute(model, images, 0, ["integrated_gradient"])
    with pytest.raises(InputError, match=r"no layer '3\.weight'; layers near it: 3"):
        attribute(model, images, 0, ["grad_cam"], layer="3.weight")
    with pytest.raises(
        InputError, match="takes no option 'steps'; its options: baseline, method, n_steps"
    ):
        attribute(model, images, 0, ["ig"], integrated_gradients={"steps": 3})
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        attribute(model, images * 255, 0, ["ig"])
    with pytest.raises(InputError, match="one per image"):
        attribute(model, images, [0, 1], ["ig"])
    transformer = nn.Sequential(
        nn.Conv2d(3, 4, 4, stride=4),
        nn.Flatten(2),
        nn.LayerNorm(16),
        nn.Flatten(),
        nn.Linear(64, 4),
    ).eval()
    with pytest.raises(InputError, match="LRP has no rule for layer type LayerNorm"):
        attribute(transformer, images, 0, ["lrp"])
    relu6 = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 14 * 14, 4)
    ).eval()
    for method in ("guided_backprop", "deeplift"):  # captum would leave ReLU6's gradient as it is
        with pytest.raises(InputError, match=f"{method} changes the backward pass of .*ReLU6"):
            attribute(relu6, images, 0, [method])


def test_lrp_conserves_through_timm_residual_blocks(monkeypatch) -> None:
    """timm's skip additions become zennit Sum modules; without that the skip copies relevance."""
    timm_layers = pytest.importorskip("timm.layers")
    from timm.models._efficientnet_blocks import InvertedResidual

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        timm_layers.BatchNormAct2d(8, act_layer=nn.ReLU),
        InvertedResidual(8, 8, exp_ratio=2.0, act_layer=nn.ReLU),
        InvertedResidual(8, 8, exp_ratio=2.0, act_layer=nn.ReLU),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4, bias=False),
    )
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):  # zero merged shift, as in tiny_cnn
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n) * 0.3)
            bn.running_var.copy_(torch.rand(n) + 0.5)
            bn.weight.data.copy_(torch.rand(n) + 0.5)
            bn.bias.data.copy_(bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps))
    model.eval()
    x, targets = torch.rand(3, 3, SIZE, SIZE), [0, 1, 2]
    with torch.no_grad():
        logit = model(x)[torch.arange(3), targets]
    method = "lrp_epsilon_gamma_box"
    sums = attribute(model, x, targets, [method]).maps[method].sum(dim=(1, 2))
    torch.testing.assert_close(sums, logit, rtol=1e-3, atol=1e-6)
    from leapcore.attribution import lrp

    original = lrp.canonizers_for
    monkeypatch.setattr(lrp, "canonizers_for", lambda network: original(network)[:1])
    broken = attribute(model, x, targets, [method]).maps[method].sum(dim=(1, 2))
    assert ((broken - logit).abs() > 0.5 * logit.abs()).all()


def test_attributions_table_round_trip_with_faithfulness(images) -> None:
    from leapcore.attribution.arrow import (
        attributions_from_arrow,
        attributions_to_arrow,
        faithfulness_scores,
    )
    from leapcore.results import schema_name

    model = tiny_cnn()
    result = attribute(
        model, images, [[0, 1], [2], [3]], ["saliency", "lrp"], preprocessing=[Normalize(MEAN, STD)]
    )
    scores = faithfulness_scores(adapter(model), images, result, steps=8)
    table = attributions_to_arrow(
        result, ["a", "b", "c", "d"], ["x.png", "y.png", "z.png"], scores, steps=8
    )
    assert schema_name(table) == "attributions" and table.num_rows == 8
    assert table.column("target_name").to_pylist()[:4] == ["a", "b", "c", "d"]
    assert table.schema.field("map").type.shape == [SIZE, SIZE]
    back, back_scores = attributions_from_arrow(table)
    for method in result.maps:
        assert torch.equal(back.maps[method], result.maps[method])
        for key, values in scores[method].items():
            torch.testing.assert_close(back_scores[method][key], values.float())
        assert (
            (scores[method]["deletion_auc"] >= 0) & (scores[method]["insertion_auc"] <= 1)
        ).all()
    assert back.targets.tolist() == [0, 1, 2, 3] and back.image_index.tolist() == [0, 0, 1, 2]


def test_report_section_and_metrics(images) -> None:
    from leapcore.attribution.arrow import attributions_to_arrow, faithfulness_scores
    from leapcore.attribution.report import attribution_metrics, attribution_section

    model = tiny_cnn()
    result = attribute(
        model, images[:2], [0, 1], ["saliency", "ig"], preprocessing=[Normalize(MEAN, STD)]
    )
    scores = faithfulness_scores(adapter(model), images[:2], result, steps=4)
    table = attributions_to_arrow(result, ["a", "b", "c", "d"], ["x.png", "y.png"], scores, steps=4)
    page = attribution_section(None, {"attributions": table, "images": images[:2]})
    assert page.count("<tr>") == 1 + 2 and page.count("data:image/png") == 2 * (1 + 2)
    assert "integrated_gradients" in page and "x.png" in page and "del " in page
    assert attribution_section(None, {}) is None
    metrics = attribution_metrics(table)
    assert metrics["attribution.saliency.deletion_auc"] == pytest.approx(
        float(scores["saliency"]["deletion_auc"].mean())
    )
    assert metrics["attribution.integrated_gradients.seconds"] == pytest.approx(
        result.seconds["integrated_gradients"], rel=1e-5
    )


def test_docs_methods_table_matches_the_registry() -> None:
    from pathlib import Path

    from leapcore.attribution.registry import methods_markdown

    docs = Path(__file__).resolve().parents[2] / "docs" / "attribution.md"
    assert methods_markdown() in docs.read_text(), "regenerate: python -m leapcore.attribution"


def test_import_leapcore_needs_no_attribution_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, leapcore, leapcore.attribution as a; a.list_methods();"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('captum', 'zennit', 'crp')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_relmax_picks_the_images_where_a_concept_carries_the_relevance(images) -> None:
    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept

    from leapcore.attribution.lrp import make_composite
    from leapcore.attribution.relmax import concept_scores, reference_images

    model = tiny_cnn()
    pool = torch.rand(6, 3, SIZE, SIZE)
    options = {"preprocessing": [Normalize(MEAN, STD)], "targets": [0, 1, 2, 3, 0, 1]}
    refs = reference_images(model, pool, "3", [0, 5], n=2, batch_size=4, **options)
    scores = concept_scores(model, pool, "3", batch_size=6, **options)  # another batching
    for row, concept in enumerate([0, 5]):
        assert refs.indices[row].tolist() == scores[:, concept].topk(2).indices.tolist()
    # Against zennit-crp called directly on the whole pool at once.
    norm = Normalize(MEAN, STD)
    data = norm(pool).requires_grad_(True)
    composite = make_composite("epsilon_plus_flat", model, norm(pool * 0), norm(pool * 0 + 1))
    out = CondAttribution(model)(
        data, [{"y": [t]} for t in options["targets"]], composite, record_layer=["3"]
    )
    direct = ChannelConcept().attribute(out.relevances["3"], abs_norm=True)
    torch.testing.assert_close(scores, direct, rtol=1e-4, atol=1e-6)
    with pytest.raises(InputError, match="has 6 channels"):
        reference_images(model, pool, "3", [9], **options)


def test_modes_are_restored_and_batch_norm_runs_in_eval_mode(images) -> None:
    model = tiny_cnn().train()
    frozen_mean = model[1].running_mean.clone()
    result = attribute(model, images, 0, ["saliency"], preprocessing=[Normalize(MEAN, STD)])
    assert all(m.training for m in model.modules())  # restored
    assert torch.equal(model[1].running_mean, frozen_mean)  # eval mode during the call
    reference = attribute(
        model.eval(), images, 0, ["saliency"], preprocessing=[Normalize(MEAN, STD)]
    )
    torch.testing.assert_close(result.maps["saliency"], reference.maps["saliency"])


def test_lrp_refuses_a_model_whose_layers_it_cannot_see(images) -> None:
    """A torch.export program (leapcore's ExportedModel) hides its layers from ``modules()``:
    zennit would place no rule and return gradient x input under LRP's name."""

    class Hidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            object.__setattr__(self, "inner", tiny_cnn())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    for method in ("lrp", "crp", "lrp_gamma"):
        with pytest.raises(InputError, match=r"LRP finds no convolution or linear layer .*Hidden"):
            attribute(Hidden(), images, 0, [method])
    assert attribute(Hidden(), images, 0, ["saliency"]).maps["saliency"].abs().sum() > 0
