"""SCAFFOLD's control variates: gradient correction at a site, the server's update."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmed.scaffold import (
    GradientCorrection,
    join_controls,
    split_controls,
    update_server_control,
    zero_controls,
)


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


def test_gradients_are_corrected_by_server_minus_site(model):
    server = {k: np.full_like(v, 2.0) for k, v in zero_controls(model).items()}
    site = {k: np.full_like(v, 0.5) for k, v in zero_controls(model).items()}
    x = torch.ones(1, 3)
    model(x).sum().backward()
    plain = model.weight.grad.clone()
    model.zero_grad()
    with GradientCorrection(model, server=server, site=site):
        model(x).sum().backward()
    assert torch.allclose(model.weight.grad, plain + 1.5)
    model.zero_grad()
    model(x).sum().backward()  # outside the context the hooks are gone
    assert torch.allclose(model.weight.grad, plain)


def test_the_new_site_control_is_the_mean_uncorrected_gradient(model):
    zeros = zero_controls(model)
    server = {k: np.full_like(v, 5.0) for k, v in zeros.items()}
    inputs = [torch.full((1, 3), v) for v in (1.0, 3.0)]
    with GradientCorrection(model, server=server, site=zeros) as correction:
        for x in inputs:
            model.zero_grad()
            model(x).sum().backward()
    # d(w.x + b)/dw = x: the mean of the two inputs, whatever the correction added
    assert np.allclose(correction.new_site_control()["weight"], 2.0)
    assert np.allclose(correction.new_site_control()["bias"], 1.0)
    assert np.allclose(correction.site_delta()["weight"], 2.0)


def test_controls_travel_beside_the_model_under_a_prefix():
    arrays = {"w": np.zeros(2)}
    joined = join_controls(arrays, {"w": np.ones(2)})
    assert sorted(joined) == ["scaffold/w", "w"]
    model, controls = split_controls(joined)
    assert list(model) == ["w"] and np.array_equal(controls["w"], np.ones(2))


def test_server_control_moves_by_the_sum_of_changes_over_all_sites():
    c = {"w": np.zeros(2, np.float32)}
    new = update_server_control(c, [{"w": np.ones(2)}, {"w": np.full(2, 3.0)}], num_sites=8)
    assert new["w"].dtype == np.float32 and np.allclose(new["w"], 0.5)
    with pytest.raises(ValueError, match="num_sites must be >= 1"):
        update_server_control(c, [], num_sites=0)
