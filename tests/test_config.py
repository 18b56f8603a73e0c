import pytest

import afgpt
from afgpt import AfGPTConfig
from conftest import tiny_config


def test_defaults_follow_lm_afs():
    config = AfGPTConfig()
    assert (config.num_hidden_layers, config.num_attention_heads, config.hidden_size) == (4, 4, 256)
    assert config.intermediate_size == 4 * config.hidden_size
    assert config.af_type == "gelu;att-linear" and config.af_layer_specific == 1
    assert (config.af_range, config.af_n_anchors, config.af_init) == (15.0, 64, 0.01)
    assert config.tie_word_embeddings and config.ffn_type == "mlp"


def test_roundtrip_through_dict(tmp_path):
    config = tiny_config(af_type="splinePerDim;att-none", af_layer_specific=2, context_size=16,
                         doc_separator_token_id=3, af_init=-1)
    config.save_pretrained(tmp_path)
    loaded = AfGPTConfig.from_pretrained(tmp_path)
    for field in ("af_type", "af_layer_specific", "context_size", "doc_separator_token_id", "af_init",
                  "intermediate_size"):
        assert getattr(loaded, field) == getattr(config, field)


@pytest.mark.parametrize("overrides, words", [
    (dict(af_type="gelu"), ["af_type", "'gelu'", "att-"]),
    (dict(af_type="gelu;linear"), ["af_type", "att-"]),
    (dict(af_type="swishy;att-linear"), ["swishy", "valid names", "gelu", "splinePerDim"]),
    (dict(af_type="gelu;att-bogus"), ["bogus", "valid names", "none"]),
    (dict(hidden_size=30, num_attention_heads=4), ["hidden_size=30", "num_attention_heads=4", "divisible"]),
    (dict(af_layer_specific=3), ["af_layer_specific=3", "0", "1", "2"]),
    (dict(af_n_anchors=1), ["af_n_anchors=1", "at least 2"]),
    (dict(af_range=0), ["af_range=0", "> 0"]),
    (dict(af_range=-2.0), ["af_range=-2.0", "> 0"]),
    (dict(af_init=0.0), ["af_init=0.0", "-1"]),
    (dict(ffn_type="moe"), ["ffn_type='moe'", "mlp"]),
    (dict(context_size=0), ["context_size=0"]),
    (dict(doc_separator_token_id=1000), ["doc_separator_token_id=1000", "vocabulary"]),
    (dict(num_hidden_layers=0), ["num_hidden_layers=0", "positive"]),
])
def test_bad_values_name_the_field_and_the_fix(overrides, words):
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    for word in words:
        assert word in str(error.value)


def test_spec_parser_exposed():
    spec = afgpt.parse_af_spec("spline;att-none")
    assert spec.mlp == "spline" and not spec.has_att_slot and str(spec) == "spline;att-none"
