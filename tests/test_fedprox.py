"""FedProx: the proximal term's formula and gradient, frozen parameters, the anchor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmed.errors import ModelError
from fedmed.fedprox import proximal_anchor, proximal_term


def _tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 2, 1),
    )


def test_proximal_term_matches_formula_and_is_zero_at_global_weights() -> None:
    model = _tiny_net()
    global_weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert proximal_term(model, global_weights, 0.3).item() == 0.0

    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    with torch.no_grad():
        squares = [((p - global_weights[n]) ** 2).sum() for n, p in model.named_parameters()]
    expected = 0.5 * 0.3 * float(sum(squares))
    term = proximal_term(model, global_weights, 0.3)
    assert term.item() == pytest.approx(expected, rel=1e-6)
    term.backward()
    weight = model[0].weight
    torch.testing.assert_close(weight.grad, 0.3 * (weight - global_weights["0.weight"]))


def test_proximal_term_skips_frozen_parameters_and_rejects_missing_keys() -> None:
    model = _tiny_net()
    global_weights = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    model[0].requires_grad_(False)
    trainable = [p for n, p in model.named_parameters() if not n.startswith("0.")]
    with torch.no_grad():
        expected = 0.5 * float(sum((p**2).sum() for p in trainable))
        assert proximal_term(model, global_weights, 1.0).item() == pytest.approx(expected, rel=1e-6)
    del global_weights["3.bias"]
    with pytest.raises(ModelError, match=r"global weights lack parameter '3\.bias'"):
        proximal_term(model, global_weights, 1.0)


def test_the_anchor_is_a_detached_copy_of_the_parameters_only() -> None:
    # Prepare
    model = _tiny_net()
    # Execute
    anchor = proximal_anchor(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    # Assert: buffers (BatchNorm statistics) are no anchor; later steps do not move it
    assert list(anchor) == [name for name, _ in model.named_parameters()]
    assert not any(t.requires_grad for t in anchor.values())
    torch.testing.assert_close(model[0].weight - 1.0, anchor["0.weight"])
    given = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    assert float(proximal_anchor(model, given)["3.bias"].abs().sum()) == 0.0


def test_public_api_is_pinned() -> None:
    import fedmed.fedprox as module

    assert sorted(module.__all__) == ["proximal_anchor", "proximal_term"]
