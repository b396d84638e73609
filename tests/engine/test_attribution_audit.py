"""Attributions inside an audit: prototypes for their own targets, samples for the top audited class."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from leapcore.adapter import LogitsModel
from leapcore.attribution.arrow import attributions_from_arrow
from leapcore.attribution.audit import explain_table, prototype_inputs, sample_inputs
from leapcore.attribution.report import attribution_section
from leapcore.config import EngineConfig
from leapcore.errors import InputError
from leapcore.prototypes import PrototypeResult
from tests.engine.test_attribution import SIZE, tiny_cnn

pytest.importorskip("captum")

CLASSES = ["cat", "dog", "fox", "owl"]


def prototypes(alpha: bool = False) -> PrototypeResult:
    torch.manual_seed(3)
    images = torch.rand(4, 3, SIZE, SIZE)
    return PrototypeResult(
        targets=[[1], [0, 2]],  # dog, and the hybrid cat+fox
        per_target=2,
        images=images,
        alphas=torch.rand(4, 1, SIZE, SIZE) if alpha else None,
        logits=torch.randn(4, 4),
        trajectory_steps=[0],
        trajectory=torch.rand(1, 4, 4),
        lr=0.05,
        steps=1,
        seconds=0.0,
    )


def test_prototypes_are_explained_for_their_own_target_as_the_model_saw_them() -> None:
    result = prototypes()
    explained = prototype_inputs(result, CLASSES, EngineConfig(), torch.device("cpu"))
    assert explained.names == [
        "prototype dog #0",
        "prototype dog #1",
        "prototype cat+fox #0",
        "prototype cat+fox #1",
    ]
    assert explained.targets == [[1], [1], [0, 2], [0, 2]]
    torch.testing.assert_close(explained.images, result.images)
    # Alpha prototypes are shown on the audit's fixed background, as isolation sees them.
    with_alpha = prototypes(alpha=True)
    shown = prototype_inputs(with_alpha, CLASSES, EngineConfig(), torch.device("cpu")).images
    again = prototype_inputs(with_alpha, CLASSES, EngineConfig(), torch.device("cpu")).images
    assert not torch.allclose(shown, with_alpha.images)
    torch.testing.assert_close(shown, again)
    background = (shown - with_alpha.images * with_alpha.alphas) / (1 - with_alpha.alphas)
    torch.testing.assert_close(background[0], background[3], atol=1e-4, rtol=1e-4)


def test_samples_are_explained_for_their_top_audited_class() -> None:
    logits = torch.tensor([[9.0, 1.0, 2.0, 0.0], [0.0, 1.0, 3.0, 8.0], [0.0, 5.0, 4.0, 9.0]])
    explained = sample_inputs(torch.rand(3, 3, 4, 4), ["a", "b", "c"], logits, [[1], [0, 2]])
    # Audited: cat, dog, fox. Image b's top class overall (owl) was not audited: fox is explained.
    assert explained.targets == [[0], [2], [1]]
    with pytest.raises(InputError, match="3 samples but 2 names"):
        sample_inputs(torch.rand(3, 3, 4, 4), ["a", "b"], logits, [[1]])


def test_the_audit_table_carries_each_picture_and_the_section_shows_prototype_rows() -> None:
    torch.manual_seed(0)
    model = LogitsModel(tiny_cnn(), 4, None, (3, SIZE, SIZE), False, False)
    explained = prototype_inputs(prototypes(), CLASSES, EngineConfig(), torch.device("cpu"))
    samples = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        logits = model(samples)
    explained = explained + sample_inputs(samples, ["s1.png", "s2.png"], logits, [[1], [0, 2]])
    table = explain_table(model, explained, ["saliency", "ig"], CLASSES, {"batch_size": 3})
    result, scores = attributions_from_arrow(table)
    # 4 prototypes x their classes (1, 1, 2, 2) + 2 samples = 8 pairs, for 2 methods.
    assert table.num_rows == 16 and len(result.targets) == 8
    first = table.slice(0, 8).to_pylist()
    assert [r["image_name"] for r in first][:6] == [
        "prototype dog #0", "prototype dog #1", "prototype cat+fox #0", "prototype cat+fox #0",
        "prototype cat+fox #1", "prototype cat+fox #1",
    ]  # fmt: skip
    assert [r["target_name"] for r in first][:6] == ["dog", "dog", "cat", "fox", "cat", "fox"]
    for row in table.to_pylist():  # each row's picture is its own image, as the model saw it
        picture = torch.from_numpy(np.array(Image.open(io.BytesIO(row["picture"])))).permute(
            2, 0, 1
        )
        expected = (explained.images[row["image_index"]].clamp(0, 1) * 255 + 0.5).to(torch.uint8)
        assert torch.equal(picture, expected), row["image_name"]
    assert torch.isfinite(scores["integrated_gradients"]["deletion_auc"]).all()
    html = attribution_section(None, {"attributions": table})
    assert html.count("<tr>") == 1 + 8
    assert "prototype cat+fox #1<br>fox" in html and "s2.png" in html
    assert html.count('alt="image"') == 8  # the pictures, without any images in the context


def test_relmax_table_and_the_crp_concepts_in_the_section() -> None:
    """The attributions table keeps CRP's concept ids; the relmax table holds, per concept, the
    reference images RelMax ranks first (as ``reference_images``) with their pictures; the section
    shows both."""
    pytest.importorskip("crp")
    from leapcore.attribution import attribute
    from leapcore.attribution.arrow import attributions_to_arrow
    from leapcore.attribution.relmax import reference_images, relmax_table

    torch.manual_seed(5)
    model = LogitsModel(tiny_cnn(), 4, None, (3, SIZE, SIZE), False, False)
    images = torch.rand(2, 3, SIZE, SIZE)
    result = attribute(model, images, [0, 1], ["saliency", "crp"], crp={"layer": "3", "top_k": 2})
    table = attributions_to_arrow(result, CLASSES, ["a.png", "b.png"], crp_layer="3")
    ids = table.column("concept_ids").to_pylist()
    assert ids[:2] == [None, None]  # saliency's rows
    assert ids[2:] == result.extras["crp"]["concept_ids"].tolist()
    assert table.schema.metadata[b"leapcore.crp_layer"] == b"3"

    pool = torch.rand(5, 3, SIZE, SIZE)
    names = [f"ref{i}.png" for i in range(5)]
    concepts = sorted({c for row in ids[2:] for c in row})
    relmax = relmax_table(model, pool, names, "3", concepts, n=3, batch_size=2)
    refs = reference_images(model, pool, "3", concepts, n=3)
    assert relmax.num_rows == 3 * len(concepts)
    rows = relmax.to_pylist()
    for k, concept in enumerate(concepts):
        mine = [r for r in rows if r["concept"] == concept]
        assert [r["rank"] for r in mine] == [0, 1, 2]
        assert [r["image_name"] for r in mine] == [names[i] for i in refs.indices[k].tolist()]
        torch.testing.assert_close(torch.tensor([r["score"] for r in mine]), refs.scores[k])
        for r in mine:
            shown = np.array(Image.open(io.BytesIO(r["picture"])))
            index = names.index(r["image_name"])
            expected = (pool[index].permute(1, 2, 0) * 255 + 0.5).to(torch.uint8).numpy()
            assert np.array_equal(shown, expected)
    html = attribution_section(None, {"attributions": table, "relmax": relmax})
    for row in ids[2:]:
        assert f"concepts {', '.join(map(str, row))}" in html
    assert "RelMax, layer 3" in html
    assert html.count('alt="reference"') == relmax.num_rows
    assert html.count("<tr><td>concept ") == len(concepts)
