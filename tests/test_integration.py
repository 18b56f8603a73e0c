"""AfGPT inside the transformers ecosystem: Auto classes, Hub remote code, pipeline, Trainer, PEFT."""
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, pipeline,
)

import afgpt
from conftest import RandomTokens, perturb, tiny_config


def test_auto_classes_know_afgpt():
    config = AutoConfig.for_model("afgpt", vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2)
    assert isinstance(config, afgpt.AfGPTConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), afgpt.AfGPTForCausalLM)


def test_saved_folder_loads_as_remote_code_without_afgpt(tmp_path):
    model = perturb(afgpt.AfGPTForCausalLM(tiny_config(af_type="spline;att-rational", af_layer_specific=0,
                                                       doc_separator_token_id=5, context_size=6)), scale=0.1)
    model.save_pretrained(tmp_path / "model")
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    generated = model.eval().generate(x[:1], max_new_tokens=10, do_sample=False, pad_token_id=0)
    torch.save({"x": x, "logits": model(x).logits, "generated": generated}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.path = [p for p in sys.path if p not in ("", {str(tmp_path)!r})]
        sys.modules["afgpt"] = None  # as if afgpt were not installed: any import of it fails
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert not type(model).__module__.startswith("afgpt"), type(model).__module__
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        # same logits; the portable spline path may round differently from afgpt's compiled kernel
        torch.testing.assert_close(model(expected["x"]).logits, expected["logits"], atol=1e-5, rtol=1e-5)
        # cached generation on this transformers, without a deprecation warning from the model's code
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
            cached = model.generate(expected["x"][:1], use_cache=True, **kwargs)
        assert torch.equal(cached, model.generate(expected["x"][:1], use_cache=False, **kwargs))
        assert torch.equal(cached, expected["generated"]), (cached, expected["generated"])
        print("REMOTE-OK", type(model).__module__)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert "REMOTE-OK transformers_modules" in result.stdout, result.stderr[-3000:]


@pytest.fixture
def gpt2_tokenizer(shared_data):
    return AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")


def test_text_generation_pipeline(gpt2_tokenizer):
    model = afgpt.AfGPTForCausalLM(tiny_config(vocab_size=len(gpt2_tokenizer), hidden_size=16)).eval()
    generator = pipeline("text-generation", model=model, tokenizer=gpt2_tokenizer, device="cpu")
    out = generator("The activation function", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("The activation function")
    assert len(gpt2_tokenizer(out[0]["generated_text"])["input_ids"]) > 3


def test_trainer_runs_three_steps_and_learns(tmp_path):
    model = afgpt.AfGPTForCausalLM(tiny_config(af_type="spline;att-spline"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens())
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "model.activations.mlp.0.values" in changed and "model.layers.0.attn.q_proj.weight" in changed


def test_peft_lora_on_qkv_projections():
    peft = pytest.importorskip("peft")
    model = perturb(afgpt.AfGPTForCausalLM(tiny_config()))
    x = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    base_logits = model.eval()(x).logits
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"],
                                                       task_type="CAUSAL_LM", init_lora_weights=True))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert sum("q_proj" in n for n in trainable) == 2 * 4  # A and B for each of 4 layers
    torch.testing.assert_close(lora(x).logits, base_logits)  # LoRA B starts at zero
    lora.train()
    loss = lora(input_ids=x, labels=x).loss
    loss.backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_A" in n and "q_proj" in n)
