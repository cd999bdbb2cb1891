"""HookedSdpaProcessor stays a copy of the installed diffusers' AttnProcessor2_0: by source and by output.

In the spirit of diffusers' ``# Copied from`` and ``utils/check_copies.py``: the two
``__call__`` bodies are compared statement by statement (comments and formatting aside),
the hook line and the stock processor's deprecation warning for ``scale`` excepted; and a
processor whose hook returns its inputs must give bitwise the stock output on every
attention path the UNet (and the VAE) can take.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ham_engine.hooked_sdpa import HOOK_LINE, HookedSdpaProcessor


class _Identity(HookedSdpaProcessor):
    """The hook sees the projections and hands them back unchanged."""

    def __init__(self) -> None:
        self.calls = 0

    def hook(self, attn, hidden_states, query, key, value):  # type: ignore[no-untyped-def]
        self.calls += 1
        return query, key, value


def _function(method: object) -> ast.FunctionDef:
    (function,) = ast.parse(textwrap.dedent(inspect.getsource(method))).body
    assert isinstance(function, ast.FunctionDef)
    return function


def _is_scale_deprecation(statement: ast.stmt) -> bool:
    """The stock processor's warning that ``scale`` is ignored: the copy leaves it out."""
    return isinstance(statement, ast.If) and "deprecate(" in ast.unparse(statement)


def test_hooked_call_is_the_stock_call_statement_for_statement_plus_the_hook() -> None:
    stock = _function(AttnProcessor2_0.__call__)
    ours = _function(HookedSdpaProcessor.__call__)
    assert ast.dump(ours.args) == ast.dump(stock.args)
    stock_body = [ast.unparse(s) for s in stock.body if not _is_scale_deprecation(s)]
    our_body = [ast.unparse(s) for s in ours.body]
    assert our_body.count(HOOK_LINE) == 1
    hook_at = our_body.index(HOOK_LINE)
    # The hook sits between the Q/K/V projections and the head split, nowhere else.
    assert our_body[hook_at - 1] == "value = attn.to_v(encoder_hidden_states)"
    del our_body[hook_at]
    assert our_body == stock_body, "diffusers' AttnProcessor2_0 changed: update ham_engine/hooked_sdpa.py to match"


def _attention_paths() -> dict[str, tuple[Attention, dict[str, torch.Tensor]]]:
    """One module per path of the processor, with inputs for a batch of 3.

    self/cross: what the UNet's transformer blocks run (attn1, attn2); spatial: a 4-D
    input through group and spatial norms with a residual and an output rescale (the
    VAE's mid-block shape); masked: a cross-attention with a normalised context, q/k
    norms and an attention mask.
    """
    generator = torch.Generator().manual_seed(11)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        modules = {
            "self": Attention(query_dim=32, heads=4, dim_head=8, out_bias=True),
            "cross": Attention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8, out_bias=True),
            "spatial": Attention(query_dim=32, heads=4, dim_head=8, bias=True, norm_num_groups=8, spatial_norm_dim=6,
                                 residual_connection=True, rescale_output_factor=2.0),
            "masked": Attention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8,
                                cross_attention_norm="layer_norm", qk_norm="layer_norm"),
        }  # fmt: skip
    mask = torch.zeros(3, 1, 7)
    mask[:, :, 5:] = -10_000.0  # the last two context tokens are masked out
    context = torch.randn(3, 7, 16, generator=generator)
    inputs = {
        "self": {"hidden_states": torch.randn(3, 16, 32, generator=generator)},
        "cross": {"hidden_states": torch.randn(3, 16, 32, generator=generator), "encoder_hidden_states": context},
        "spatial": {
            "hidden_states": torch.randn(3, 32, 4, 4, generator=generator),
            "temb": torch.randn(3, 6, 2, 2, generator=generator),
        },
        "masked": {
            "hidden_states": torch.randn(3, 16, 32, generator=generator),
            "encoder_hidden_states": context,
            "attention_mask": mask,
        },
    }
    return {name: (modules[name].eval().requires_grad_(False), inputs[name]) for name in modules}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["self", "cross", "spatial", "masked"])
def test_an_identity_hook_is_bitwise_the_stock_processor(path: str, dtype: torch.dtype) -> None:
    module, inputs = _attention_paths()[path]
    module.to(dtype)
    inputs = {name: tensor.to(dtype) for name, tensor in inputs.items()}
    hooked = _Identity()
    with torch.inference_mode():
        module.set_processor(AttnProcessor2_0())
        stock = module(**inputs)
        module.set_processor(hooked)
        out = module(**inputs)
    assert hooked.calls == 1
    assert out.dtype == stock.dtype and torch.equal(out, stock)


def test_an_identity_hook_in_every_layer_of_a_unet_is_bitwise_the_stock_unet() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=8,
        )
    unet.eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(3)
    latents, text = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 7, 16, generator=generator)
    with torch.inference_mode():
        unet.set_attn_processor(AttnProcessor2_0())
        stock = unet(latents, torch.tensor(501), encoder_hidden_states=text).sample
        hooked = _Identity()
        unet.set_attn_processor(hooked)
        out = unet(latents, torch.tensor(501), encoder_hidden_states=text).sample
    assert hooked.calls == len(unet.attn_processors) > 0
    assert torch.equal(out, stock)
