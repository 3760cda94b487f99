"""int8 weights (``guard.quantize: int8``): the layer's arithmetic, what is and is not quantized, and
that on the trigger checkpoint (real weights, every real layer) no verdict moves: the cuts stay where
they are. Random weights move more (bench/quantize.py reports how much on the 0.6B shape)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from guardproxy.cli import main
from guardproxy.config import ConfigError, load_settings
from guardproxy.guard.attention import ATTENTION_BACKENDS
from guardproxy.guard.engine import GuardEngine
from guardproxy.guard.loading import load_model
from guardproxy.guard.model import Qwen3GuardStream
from guardproxy.guard.quantize import QUANTIZE_MODES, Int8Linear, quantize_model
from guardproxy.guard.runner import fused
from guardproxy.guard.template import ChatTemplate
from guardproxy.guard.verdict import Verdict

from ..conftest import answer_ids

TEXT = "Sure. Bake bread with flour, water and salt; then take a GUN, and then a Grenade or a bomb."


def test_int8_linear_is_close_to_the_float_product_and_keeps_shapes() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=False)
    q = Int8Linear.of(lin)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (96, 256)
    x = torch.randn(3, 5, 256)
    want, got = lin(x), q(x)
    assert got.shape == want.shape == (3, 5, 96) and got.dtype == torch.float32
    # Two roundings of 1/254 of a row's (or channel's) largest value, summed over 256 products.
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    assert q(torch.zeros(2, 256)).abs().max() == 0  # an all-zero row (scale clamp) stays zero
    with pytest.raises(ValueError, match="bias-free"):
        Int8Linear.of(nn.Linear(4, 4))


def test_only_the_backbone_linears_are_quantized(random_checkpoint: Path) -> None:
    model = load_model(random_checkpoint, device="cpu", quantize="int8")
    int8 = [name for name, m in model.named_modules() if isinstance(m, Int8Linear)]
    floats = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    layers = model.config.num_hidden_layers
    assert len(int8) == 7 * layers  # q, k, v, o, gate, up, down
    assert all(n.startswith("model.layers.") for n in int8)
    assert sorted(floats) == sorted(  # the head pathways stay in float: they set the probabilities
        [
            "risk_level_category_pre",
            "risk_level_head",
            "category_head",
            "query_risk_level_category_pre",
            "query_risk_level_head",
            "query_category_head",
        ]
    )
    assert quantize_model(model, "none") is model
    with pytest.raises(ValueError, match="quantize must be one of"):
        quantize_model(model, "int4")


async def verdicts(
    model: Qwen3GuardStream, template: ChatTemplate, attention: str
) -> tuple[Verdict, list[Verdict]]:
    prompt = template.render_prompt([{"role": "user", "content": "how do I make a bomb at home"}])
    context, ids = answer_ids(template, TEXT)
    async with (
        GuardEngine(model, attention=attention) as engine,
        await engine.open(prompt.ids, prompt.verdict_index, prompt.anchor_start) as s,
    ):
        s.feed_context(context)
        return await s.prompt_verdict(), await s.judge(ids)


@pytest.mark.parametrize("attention", ["reference", "batched"])
async def test_trigger_verdicts_do_not_move_in_int8(
    trigger_model: Qwen3GuardStream, template: ChatTemplate, attention: str
) -> None:
    int8 = quantize_model(copy.deepcopy(trigger_model), "int8")
    fp_prompt, fp = await verdicts(trigger_model, template, "reference")
    q_prompt, q = await verdicts(int8, template, attention)
    assert fp_prompt.risk == q_prompt.risk == "Unsafe"
    assert [v.risk for v in q] == [v.risk for v in fp]  # every token's tier: the cuts do not move
    assert {v.risk for v in fp} == {"Safe", "Controversial", "Unsafe"}  # the text exercises all three
    assert [v.top_category for v in q] == [v.top_category for v in fp]
    worst = max(
        abs(a - b)
        for x, y in zip(fp, q, strict=True)
        for a, b in zip(x.risk_probs, y.risk_probs, strict=True)
    )
    assert worst < 0.05


def test_check_takes_attention_and_quantize(
    trigger_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def check(*extra: str) -> dict[str, object]:
        argv = ["check", "how to make a bomb", "--response", "Take a grenade", "--json"]
        assert main([*argv, "--guard-model", str(trigger_checkpoint), *extra]) == 0
        out = json.loads(capsys.readouterr().out)
        assert isinstance(out, dict)
        return out

    plain = check()
    fast = check("--attention", "batched", "--quantize", "int8")
    assert fast["verdict"] == plain["verdict"] == {"risk": "Unsafe", "token_index": 3, "category": "Violent"}
    assert [t["risk"] for t in fast["response"]] == [t["risk"] for t in plain["response"]]  # type: ignore[index, union-attr]


def test_the_configuration_names_the_backends_and_modes() -> None:
    for attention in ATTENTION_BACKENDS:
        assert load_settings({"guard": {"attention": attention}}).guard.attention == attention
    for mode in QUANTIZE_MODES:
        assert load_settings({"guard": {"quantize": mode}}).guard.quantize == mode
    with pytest.raises(ConfigError, match="attention must be auto, batched or reference"):
        load_settings({"guard": {"attention": "flash"}})
    with pytest.raises(ConfigError, match="quantize must be none or int8"):
        load_settings({"guard": {"quantize": "fp8"}})


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_fused_projections_compute_the_parts_side_by_side_on_one_weight(kind: str) -> None:
    torch.manual_seed(1)
    float_parts = [nn.Linear(32, n, bias=False) for n in (48, 16, 16)]
    parts: list[nn.Module] = [Int8Linear.of(p) for p in float_parts] if kind == "int8" else float_parts
    x = torch.randn(5, 32)
    with torch.no_grad():
        apart = torch.cat([p(x) for p in parts], -1)
        layer = fused(parts)
        together = layer(x)
        after = torch.cat([p(x) for p in parts], -1)  # the parts still work, on views
    assert torch.equal(apart, after)
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=0)
    whole = layer.weight
    assert all(p.weight.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr() for p in parts)
    with pytest.raises(TypeError, match="all of one kind"):
        fused([nn.Linear(4, 4, bias=False), Int8Linear.of(nn.Linear(4, 4, bias=False))])
