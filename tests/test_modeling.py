import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from afgpt import AfGPTForCausalLM, AfGPTForSequenceClassification, AfGPTModel
from conftest import perturb, tiny_config


def tokens(batch=2, seq=16, vocab=97, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_loss_is_next_token_cross_entropy():
    model = perturb(AfGPTForCausalLM(tiny_config()))
    x = tokens()
    out = model(x, labels=x, skip_logits=False)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert out.logits.shape == (2, 16, 97)


def test_shift_labels_give_one_prediction_per_position():
    model = perturb(AfGPTForCausalLM(tiny_config()))
    window = tokens(seq=17)
    out = model(window[:, :-1], shift_labels=window[:, 1:], skip_logits=False)
    expected = F.cross_entropy(out.logits.reshape(-1, 97), window[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_inputs_embeds_equal_input_ids():
    model = perturb(AfGPTForCausalLM(tiny_config())).eval()
    x = tokens()
    from_ids = model(x).logits
    from_embeds = model(inputs_embeds=model.model.embed_tokens(x)).logits
    torch.testing.assert_close(from_ids, from_embeds)


def test_lm_afs_architecture_and_initialisation():
    config = tiny_config(num_hidden_layers=5, af_type="gelu;att-linear")
    model = AfGPTForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert model.model.num_encoder_layers == 3 and model.model.skip_weights.shape == (2,)
    assert torch.all(model.model.skip_weights == 1)
    for block in model.model.layers:
        assert torch.equal(block.block_lambdas, torch.tensor([1.0, 0.0]))
        assert block.attn.value_lambda.item() == 0.5
        assert torch.all(block.attn.o_proj.weight == 0) and torch.all(block.mlp.proj.weight == 0)
        assert block.attn.q_proj.bias is None and block.mlp.fc.bias is None
        assert 0.015 < block.attn.q_proj.weight.std() < 0.025
        assert block.attn.pre_activation.weight.item() == 1 and block.attn.pre_activation.bias.item() == 0
        assert isinstance(block.attn_norm, torch.nn.RMSNorm)
    assert isinstance(model.model.embed_norm, torch.nn.LayerNorm)
    untied = AfGPTForCausalLM(tiny_config(tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert torch.all(untied.lm_head.weight == 0)


def test_att_none_has_no_slot_and_att_linear_is_residual_affine():
    assert AfGPTModel(tiny_config(af_type="gelu;att-none")).layers[0].attn.pre_activation is None
    model = perturb(AfGPTModel(tiny_config(af_type="gelu;att-linear")))
    attn = model.layers[0].attn
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        attn.pre_activation.weight.fill_(2.0)
        attn.pre_activation.bias.fill_(0.5)
    captured = {}
    handle = attn.q_proj.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    cos, sin = model.rotary_emb(x, torch.arange(3)[None])
    attn(x, (cos, sin), None)
    handle.remove()
    torch.testing.assert_close(captured["x"], x + (2 * x + 0.5))  # x + f(a x + b), f = identity


@pytest.mark.parametrize("sharing, slots", [(0, [0, 0, 0, 0, 0]), (1, [0, 1, 2, 3, 4]), (2, [0, 1, 1, 1, 2])])
def test_layer_sharing_modes(sharing, slots):
    model = AfGPTModel(tiny_config(num_hidden_layers=5, af_type="spline;att-spline", af_layer_specific=sharing))
    mlp_ids = [id(model.activations.module("mlp", i)) for i in range(5)]
    assert [id(model.activations.module("att", i)) for i in range(5)] != mlp_ids
    assert [sorted(set(mlp_ids), key=mlp_ids.index).index(i) for i in mlp_ids] == slots
    assert len(model.activations.mlp) == len(model.activations.att) == max(slots) + 1


def test_sharing_survives_save_and_load(tmp_path):
    model = AfGPTForCausalLM(tiny_config(af_type="spline;att-spline", af_layer_specific=0))
    model.save_pretrained(tmp_path)
    loaded = AfGPTForCausalLM.from_pretrained(tmp_path)
    spline_params = [n for n, _ in loaded.named_parameters() if "activations" in n]
    assert spline_params == ["model.activations.mlp.0.values", "model.activations.att.0.values"]
    # an update through the last layer is seen by the first
    x = tokens()
    first_before = loaded.model.activations.module("mlp", 0)(torch.tensor([0.3])).item()
    with torch.no_grad():
        loaded.model.activations.module("mlp", 3).values.add_(1.0)
    assert loaded.model.activations.module("mlp", 0)(torch.tensor([0.3])).item() == pytest.approx(first_before + 1.0)
    loaded(x, labels=x).loss.backward()
    assert loaded.model.activations.mlp[0].values.grad is not None


@pytest.mark.parametrize("af_type", ["gelu;att-linear", "spline;att-spline", "splinePerDim;att-rational",
                                     "prelu;att-swish", "relu2;att-none"])
def test_save_and_load_reproduce_logits_exactly(tmp_path, af_type):
    model = perturb(AfGPTForCausalLM(tiny_config(af_type=af_type, af_layer_specific=2))).eval()
    x = tokens()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is AfGPTForCausalLM
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_documents_do_not_attend_to_each_other():
    model = perturb(AfGPTForCausalLM(tiny_config(doc_separator_token_id=0)), scale=0.3).eval()
    x = tokens(batch=1, seq=12).clamp(min=1)
    x[0, 6] = 0  # a new document starts at position 6
    y = x.clone()
    y[0, :6] = (x[0, :6] % 96) + 1  # change the first document only
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, 6:], b[:, 6:])
    assert not torch.allclose(a[:, :6], b[:, :6])
    plain = perturb(AfGPTForCausalLM(tiny_config()), scale=0.3).eval()
    assert not torch.allclose(plain(x).logits[:, 6:], plain(y).logits[:, 6:])


def test_sliding_window_limits_the_receptive_field():
    model = perturb(AfGPTForCausalLM(tiny_config(num_hidden_layers=1, context_size=3)), scale=0.3).eval()
    x = tokens(batch=1, seq=10)
    y = x.clone()
    y[0, 0] = (x[0, 0] + 1) % 97
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, 3:], b[:, 3:])  # position 3 sees 1..3 only
    assert not torch.allclose(a[:, :3], b[:, :3])


def test_padding_mask_hides_padded_positions():
    model = perturb(AfGPTForCausalLM(tiny_config()), scale=0.3).eval()
    x = tokens(batch=1, seq=8)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], 1)
    positions = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.arange(8)[None]], 1)
    out = model(padded, attention_mask=mask, position_ids=positions).logits[:, 3:]
    torch.testing.assert_close(out, model(x).logits, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = perturb(AfGPTForCausalLM(tiny_config(af_type="spline;att-spline")))
    x = tokens()
    model.train()
    model(x, labels=x).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.model.gradient_checkpointing
    model(x, labels=x).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], msg=name)


def test_bf16_autocast_forward_and_backward():
    model = perturb(AfGPTForCausalLM(tiny_config(af_type="spline;att-spline")))
    x = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.model.activations.mlp[0].values.dtype == torch.float32
    assert model.model.activations.mlp[0].values.grad is not None


def test_token_ids_beyond_the_vocabulary_are_rejected():
    model = AfGPTForCausalLM(tiny_config())
    with pytest.raises(ValueError, match="token id 200 >= vocab_size 97"):
        model(torch.tensor([[1, 200]]))


def test_exactly_one_of_ids_or_embeds():
    model = AfGPTForCausalLM(tiny_config())
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_sequence_classification_pools_last_non_padding_token():
    config = tiny_config(pad_token_id=0, num_labels=3)
    model = perturb(AutoModelForSequenceClassification.from_config(config)).eval()
    assert isinstance(model, AfGPTForSequenceClassification)
    short = tokens(batch=1, seq=5).clamp(min=1)
    padded = torch.cat([short, torch.zeros(1, 4, dtype=torch.long)], 1)
    batch = torch.cat([padded, tokens(batch=1, seq=9, seed=1).clamp(min=1)])
    out = model(batch, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss is not None
    torch.testing.assert_close(out.logits[0], model(short).logits[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pad_token_id"):
        AfGPTForSequenceClassification(tiny_config())(tokens())


def test_whole_model_compiles_with_fullgraph():
    model = perturb(AfGPTForCausalLM(tiny_config(af_type="spline;att-spline"))).eval()
    x = tokens()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, use_cache=False).logits, model(x, use_cache=False).logits)


def test_rotary_rotates_each_half_pair_by_its_position_angle():
    from afgpt.modeling_afgpt import AfGPTRotaryEmbedding, rotate
    rotary = AfGPTRotaryEmbedding(tiny_config())
    x = torch.randn(2, 4, 7, rotary.head_dim)
    positions = torch.arange(3, 10)[None]
    cos_signed, sin_signed = rotary(x, positions)
    angles = positions[..., None].float() * rotary.compute_inv_freq()
    cos, sin = torch.cat((angles, angles), dim=-1).cos(), torch.cat((angles, angles), dim=-1).sin()
    torch.testing.assert_close(cos_signed, cos)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # the rotate_half formulation (Llama, lm-afs)
    got = rotate(x, cos_signed[:, None], sin_signed[:, None])
    torch.testing.assert_close(got, x * cos[:, None] + rotated * sin[:, None])
    g1, g2 = got.chunk(2, dim=-1)
    torch.testing.assert_close(g1 ** 2 + g2 ** 2, x1 ** 2 + x2 ** 2)  # a rotation of each (x1[i], x2[i]) pair


def test_rotary_table_matches_computed_positions_also_after_from_pretrained(tmp_path):
    model = perturb(AfGPTForCausalLM(tiny_config(max_position_embeddings=16))).eval()
    x = tokens(seq=12)
    explicit = model(x, position_ids=torch.arange(12)[None]).logits
    torch.testing.assert_close(model(x).logits, explicit)  # a slice of the table
    longer = tokens(seq=20)  # past the table: computed, and the same as explicit positions
    torch.testing.assert_close(model(longer).logits, model(longer, position_ids=torch.arange(20)[None]).logits)
    model.save_pretrained(tmp_path)
    rotary = AfGPTForCausalLM.from_pretrained(tmp_path).model.rotary_emb
    cos, sin_signed = rotary(torch.zeros(1), torch.arange(16)[None])
    torch.testing.assert_close(rotary.cos_table, cos[0])
    torch.testing.assert_close(rotary.sin_table, sin_signed[0])


def test_position_ids_path_equals_the_table_in_bf16():
    """After model.to(bf16) explicit positions must rotate as the table does (a bf16 inv_freq was 0.15 off in cos)."""
    rotary = AfGPTForCausalLM(tiny_config(max_position_embeddings=2048)).to(torch.bfloat16).model.rotary_emb
    x = torch.zeros(1, dtype=torch.bfloat16)
    positions = torch.arange(990, 1010)
    cos, sin = rotary(x, positions[None])
    table_cos, table_sin = rotary.consecutive(x, 990, 20)
    assert torch.equal(cos, table_cos) and torch.equal(sin, table_sin)
    exact = positions[:, None].double() * (1.0 / 10000.0 ** (torch.arange(0, 16, 2).double() / 16))
    torch.testing.assert_close(cos[0, :, :8].double(), exact.cos(), atol=2 ** -8, rtol=0)


def test_output_attentions_and_hidden_states(tmp_path):
    config = tiny_config(num_hidden_layers=3)
    config._attn_implementation = "eager"
    model = perturb(AfGPTForCausalLM(config)).eval()
    x = tokens(seq=7)
    out = model(x, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 3 and out.attentions[0].shape == (2, 2, 7, 7)
    torch.testing.assert_close(out.attentions[1].sum(-1), torch.ones(2, 2, 7))
    assert torch.all(out.attentions[0].triu(1) == 0)  # causal
    assert len(out.hidden_states) == 4 and out.hidden_states[0].shape == (2, 7, 32)
    assert out.hidden_states[-1] is not None
    # the flags also come from the config, as in every transformers model
    model.config.output_hidden_states = True
    assert len(model(x).hidden_states) == 4
    generated = model.generate(x[:1], max_new_tokens=3, do_sample=False, pad_token_id=0, output_attentions=True,
                               return_dict_in_generate=True)
    assert len(generated.attentions) == 3 and len(generated.attentions[0]) == 3


def test_return_dict_false_gives_tuples():
    model = perturb(AfGPTForCausalLM(tiny_config())).eval()
    x = tokens()
    as_dict = model(x, labels=x)
    loss, logits = model(x, labels=x, return_dict=False)[:2]
    assert torch.equal(loss, as_dict.loss) and torch.equal(logits, as_dict.logits)
    assert isinstance(model.model(x, return_dict=False), tuple)
    model.config.return_dict = False
    assert isinstance(model(x), tuple)
    classifier = AfGPTForSequenceClassification(tiny_config(pad_token_id=0))
    assert isinstance(classifier(x, return_dict=False), tuple)


def test_unknown_forward_keywords_are_rejected():
    model = AfGPTForCausalLM(tiny_config())
    with pytest.raises(TypeError, match="output_attention"):
        model(tokens(), output_attention=True)  # a typo must not pass silently
