"""Mamba-2: the chunked PyTorch SSD equals the step-by-step recurrence, and chunked sequences carry state."""

import pytest
import torch
from tiny_models import tiny_text_config
from transformers import NemotronHConfig

from timeviper.modeling_timeviper import TimeViperMamba2Mixer, ssd_scan

pytestmark = pytest.mark.numerics  # re-run under other CPU kernels: test_machine_independence.py


def sequential_scan(x, dt, A, B, C, D):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T; y_t = h_t C_t + D x_t, one step at a time."""
    batch, length, heads, head_dim = x.shape
    rep = heads // B.shape[2]
    B, C = B.repeat_interleave(rep, 2), C.repeat_interleave(rep, 2)
    state = torch.zeros(batch, heads, head_dim, B.shape[-1], dtype=torch.float64)
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = state * decay + (dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, :, None, :])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]) + D[:, None] * x[:, t])
    return torch.stack(ys, 1), state


def test_chunked_ssd_equals_recurrence():
    torch.manual_seed(0)
    b, l, h, p, g, n = 2, 37, 4, 3, 2, 5
    x, B, C = torch.randn(b, l, h, p), torch.randn(b, l, g, n), torch.randn(b, l, g, n)
    dt = torch.rand(b, l, h) * 0.5
    A, D = -torch.rand(h) * 2, torch.randn(h)
    y, state = ssd_scan(x, dt, A, B, C, D, chunk_size=8)
    y_ref, state_ref = sequential_scan(*(t.double() for t in (x, dt, A, B, C, D)))
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.double(), state_ref, atol=1e-5, rtol=1e-5)


def mixer():
    values = tiny_text_config("nemotron_h")
    values.pop("model_type")
    torch.manual_seed(0)
    module = TimeViperMamba2Mixer(NemotronHConfig(**values), layer_idx=0)
    with torch.no_grad():
        module.dt_bias.uniform_(-3, 0)
        module.conv1d.weight.normal_()
    return module


def test_splitting_the_sequence_carries_state_exactly():
    module = mixer()
    hidden = torch.randn(2, 29, 48)
    with torch.no_grad():
        whole, whole_state = module(hidden)
        first, state = module(hidden[:, :11])
        second, state = module(hidden[:, 11:], state=state)
        steps, step_state = [], None
        for t in range(hidden.shape[1]):
            out, step_state = module(hidden[:, t : t + 1], state=step_state)
            steps.append(out)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-5, rtol=0)
    for a, b in zip(state, whole_state):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_left_padding_is_exact_and_trailing_padding_keeps_the_ssm_state():
    """Left padding (generation) changes nothing; trailing padding (training) leaves the SSM state untouched
    because padded positions get dt = 0."""
    module = mixer()
    hidden = torch.randn(1, 9, 48)
    with torch.no_grad():
        out, (conv, ssm) = module(hidden)
        padded = torch.cat([torch.randn(1, 4, 48), hidden], 1)
        left_valid = torch.arange(13)[None] >= 4
        left_out, (left_conv, left_ssm) = module(padded, valid=left_valid)
        trailing = torch.cat([hidden, torch.randn(1, 3, 48)], 1)
        _, (_, trailing_ssm) = module(trailing, valid=torch.arange(12)[None] < 9)
    torch.testing.assert_close(left_out[:, 4:], out, atol=1e-5, rtol=0)
    torch.testing.assert_close(left_ssm, ssm, atol=1e-5, rtol=0)
    torch.testing.assert_close(left_conv, conv, atol=1e-6, rtol=0)
    torch.testing.assert_close(trailing_ssm, ssm, atol=1e-5, rtol=0)
