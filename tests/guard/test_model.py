"""The model loads through the production path, strictly, and reports full distributions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from guardproxy.guard.checkpoint import GuardModelError
from guardproxy.guard.model import Qwen3GuardStream, load_guard_model
from guardproxy.guard.testing import QUERY_CATEGORIES, RESPONSE_CATEGORIES, guard_config, random_guard_model


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_round_trip_is_exact(random_checkpoint: Path) -> None:
    model = load_guard_model(random_checkpoint, device="cpu")
    reference = random_guard_model("tiny", seed=1)
    for (name, got), (_, want) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(got, want), name
    ids = torch.tensor([[151644, 872, 198, 9707, 151645, 198]])
    with torch.no_grad():
        assert torch.allclose(model(ids).response.risk, reference(ids).response.risk, atol=0)


def test_parameter_names_are_the_released_ones(random_model: Qwen3GuardStream) -> None:
    names = set(random_model.state_dict())
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.norm.weight" in names
    for head in (
        "risk_level_category_pre",
        "risk_level_category_layernorm",
        "risk_level_head",
        "category_head",
        "query_risk_level_category_pre",
        "query_risk_level_category_layernorm",
        "query_risk_level_head",
        "query_category_head",
    ):
        assert f"{head}.weight" in names
    assert not any(n.startswith("lm_head") for n in names)


def test_labels_come_from_the_checkpoint_config(random_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy(random_checkpoint, tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["response_risk_level_map"] = {"0": "Safe", "1": "Controversial", "2": "Unsafe"}
    cfg["response_category_map"]["3"] = "Personal Data"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    model = load_guard_model(ckpt, device="cpu")
    assert model.labels.response.risk == ("Safe", "Controversial", "Unsafe")
    assert model.labels.response.category[3] == "Personal Data"
    assert model.labels.query.category == tuple(QUERY_CATEGORIES)
    assert len(model.labels.response.category) == len(RESPONSE_CATEGORIES)


def test_outputs_are_full_distributions(random_model: Qwen3GuardStream) -> None:
    ids = torch.randint(0, 151000, (2, 9))
    with torch.no_grad():
        out = random_model(ids)
    assert out.response.risk.shape == (2, 9, 3)
    assert out.response.category.shape == (2, 9, 8)
    assert out.query.risk.shape == (2, 9, 3)
    assert out.query.category.shape == (2, 9, 9)
    for t in (out.response.risk, out.response.category, out.query.risk, out.query.category):
        assert torch.allclose(t.sum(-1), torch.ones(t.shape[:-1]), atol=1e-5)
        assert (t > 0).all()


def test_cpu_default_dtype_is_fp32_and_overridable(random_checkpoint: Path) -> None:
    assert next(load_guard_model(random_checkpoint, device="cpu").parameters()).dtype == torch.float32
    bf16 = load_guard_model(random_checkpoint, device="cpu", dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert bf16.model.rotary_emb.inv_freq.dtype == torch.float32  # RoPE frequencies rebuilt, not meta


def _rewrite_weights(ckpt: Path, edit: object) -> None:
    file = ckpt / "model.safetensors"
    state = load_file(str(file))
    edit(state)  # type: ignore[operator]
    save_file(state, str(file))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("query_category_head.weight"), r"missing 1 weights.*query_category_head"),
        (lambda s: s.update({"score.weight": torch.zeros(3, 64)}), r"unexpected 1 weights.*score\.weight"),
        (
            lambda s: s.update({"risk_level_head.weight": torch.zeros(4, 32)}),
            r"risk_level_head.weight has shape \(4, 32\)",
        ),
    ],
    ids=["missing", "unexpected", "wrong-shape"],
)
def test_bad_weights_fail_loudly(random_checkpoint: Path, tmp_path: Path, edit: object, message: str) -> None:
    ckpt = _copy(random_checkpoint, tmp_path / "ckpt")
    _rewrite_weights(ckpt, edit)
    with pytest.raises(GuardModelError, match=message):
        load_guard_model(ckpt, device="cpu")


def test_tied_lm_head_is_the_one_ignored_key(random_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy(random_checkpoint, tmp_path / "ckpt")
    _rewrite_weights(ckpt, lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"].clone()}))
    load_guard_model(ckpt, device="cpu")


def test_sharded_checkpoint_loads(random_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy(random_checkpoint, tmp_path / "ckpt")
    state = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(ckpt / file))
        weight_map.update({k: file for k in keys})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_guard_model(ckpt, device="cpu")
    assert torch.equal(model.risk_level_head.weight, state["risk_level_head.weight"])


def test_config_without_guard_keys_is_rejected(random_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy(random_checkpoint, tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["guard_inner_size"], cfg["query_category_map"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GuardModelError, match=r"guard_inner_size, .*query_category_map"):
        load_guard_model(ckpt, device="cpu")


def test_label_map_must_cover_the_head(random_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy(random_checkpoint, tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["response_category_map"]["7"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GuardModelError, match=r"response_category_map must label indices 0..7"):
        load_guard_model(ckpt, device="cpu")


def test_bad_sources_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(GuardModelError, match="no such checkpoint directory"):
        load_guard_model(tmp_path / "nope")
    with pytest.raises(GuardModelError, match=r"no config\.json"):
        load_guard_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(guard_config("tiny").to_dict()))
    with pytest.raises(GuardModelError, match=r"no model\.safetensors"):
        load_guard_model(tmp_path)


def test_hub_id_goes_to_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    # The hub cannot be reached here (HF_HUB_OFFLINE): the error must say it was a hub fetch.
    with pytest.raises(GuardModelError, match="could not fetch from the hub"):
        load_guard_model("Qwen/Qwen3Guard-Stream-0.6B-does-not-exist")


def test_0_6b_preset_has_the_released_shape() -> None:
    c = guard_config("0.6b")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (
        1024,
        28,
        16,
        8,
    )
    assert (c.head_dim, c.intermediate_size, c.vocab_size, c.guard_inner_size) == (128, 3072, 151936, 512)
    assert c.max_position_embeddings == 8192 and c.rope_parameters["rope_theta"] == 1e6
    with torch.device("meta"):
        model = Qwen3GuardStream(c)
    # 0.6B: ~440M non-embedding parameters plus a 151936 x 1024 embedding.
    assert 430e6 < model.non_embedding_parameters < 450e6
