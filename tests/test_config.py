"""ModelConfig: presets, parameter arithmetic, HF config.json round trips and validation."""
import pytest

from nanoseek.config import PRESETS, ModelConfig, get_preset


def test_v3_parameter_counts():
    n = get_preset("deepseek-v3").num_params()
    assert abs(n["total"] / 671e9 - 1) < 0.01
    # DeepSeek's "37B activated" rounds down an exact count of ~37.5B (embedding + head included)
    assert abs(n["active"] / 37e9 - 1) < 0.02


def test_presets_sizes():
    assert get_preset("tiny").num_params()["total"] < 5e6
    small = get_preset("small").num_params()
    assert 80e6 < small["total"] < 120e6 and 20e6 < small["active"] < 30e6
    lite = get_preset("deepseek-v2-lite").num_params()
    assert abs(lite["total"] / 15.7e9 - 1) < 0.01


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_round_trip(name):
    cfg = get_preset(name)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_from_hf_new_style_rope_parameters():
    hf = get_preset("deepseek-v3").to_hf()
    rope = hf.pop("rope_scaling")
    hf["rope_parameters"] = {**rope, "rope_theta": 10000.0}
    hf.pop("rope_theta")
    assert ModelConfig.from_hf(hf) == get_preset("deepseek-v3")


def test_v3_softmax_scale():
    assert get_preset("deepseek-v3").softmax_scale() == pytest.approx(0.13523, abs=1e-4)


@pytest.mark.parametrize("bad,msg", [
    ({"model_type": "llama"}, "model_type"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"n_group": 3}, "divisible"),
    ({"q_lora_rank": None}, "q_lora_rank"),  # tiny has DSA on, which needs the q latent
])
def test_validation_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        get_preset("tiny", **bad)


def test_unknown_model_type_from_hf():
    with pytest.raises(ValueError, match="unsupported model_type 'mistral'"):
        ModelConfig.from_hf({"model_type": "mistral"})
