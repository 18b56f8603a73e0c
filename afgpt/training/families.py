"""The model families `afgpt train --model` trains: AfGPT, GPT-Neo (causal LM) and RoBERTa (masked LM).

Each family is a fresh model of the run's shape (--size preset or the width/depth flags) and vocabulary, with the
run's activations (--af-type, --af-layer-specific, spline grid) and feed-forward (--ffn-type, kan_*): AfGPT takes
them in AfGPTConfig; GPT-Neo and RoBERTa are built vanilla and patched with afgpt.patch_model, so the loop finds
their activations with afgpt.find_activation_set like AfGPT's, and the saved model reloads with
AutoModelForCausalLM / AutoModelForMaskedLM.from_pretrained after `import afgpt`.

    gpt-neo  GPTNeoForCausalLM: global attention in every layer (eager: transformers has no SDPA for GPT-Neo),
             MLP 4x hidden, no dropout, tied embeddings, learned positions (max_position_embeddings = seq_length).
    roberta  RobertaForMaskedLM: SDPA attention, MLP 4x hidden, no dropout (like AfGPT and GPT-Neo), LayerNorm eps
             1e-5, one token type, positions offset by the padding index (max_position_embeddings = seq_length + 2).
             Its tokenizer needs <s> </s> <pad> <mask> (roberta-base's, or the BPE trained for the run).
"""
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, GPTNeoConfig, GPTNeoForCausalLM,
                          PretrainedConfig, PreTrainedTokenizerBase, RobertaConfig, RobertaForMaskedLM)

from .. import data as data_lib
from ..activation_set import find_activation_set
from ..bank import ActivationBank
from ..kan import KANFeedForward
from ..modeling_afgpt import AfGPTForCausalLM
from ..patching import is_patched, patch_model
from .config import TrainConfig
from .rundata import RunData, shard_record

logger = logging.getLogger("afgpt")
MASKED_LM_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "mask_token")  # RoBERTa's needs


@dataclass(frozen=True)
class Family:
    """How `afgpt train` builds, trains and reloads one model family."""

    name: str
    objective: str  # "causal" or "masked": afgpt.training.objectives
    auto_class: type  # reloads a saved run after `import afgpt`
    model_types: tuple[str, ...]  # config.json model_type of a saved model of this family


FAMILY = {
    "afgpt": Family("afgpt", "causal", AutoModelForCausalLM, ("afgpt",)),
    "gpt-neo": Family("gpt-neo", "causal", AutoModelForCausalLM, ("gpt_neo", "afgpt_gpt_neo")),
    "roberta": Family("roberta", "masked", AutoModelForMaskedLM, ("roberta", "afgpt_roberta")),
}


def build_model(cfg: TrainConfig, run_data: RunData, bank: ActivationBank | None = None) -> torch.nn.Module:
    """A fresh model of cfg.model's family as `cfg` describes (or the saved one cfg.model_name_or_path names).

    A stage II bank sets the spline grid (af_range, af_n_anchors); the loop loads the bank itself.
    """
    if cfg.model_name_or_path:
        return load_model(cfg, run_data)
    return fresh_model(cfg, run_data.vocab_size, run_data.tokenizer, run_data.doc_separator,
                       bank.settings if bank is not None else cfg)


def fresh_model(cfg: TrainConfig, vocab_size: int, tokenizer: PreTrainedTokenizerBase | None = None,
                doc_separator: int | None = None, grid=None) -> torch.nn.Module:
    """A new model of cfg's family and shape; `grid` (default: cfg) gives the spline grid."""
    grid = grid or cfg
    if cfg.model == "afgpt":
        config = cfg.model_config(
            vocab_size, af_range=grid.af_range, af_n_anchors=grid.af_n_anchors, doc_separator_token_id=doc_separator,
            eos_token_id=tokenizer.eos_token_id if tokenizer else None,
            bos_token_id=tokenizer.bos_token_id if tokenizer else None)
        return AfGPTForCausalLM(config)
    model = (GPTNeoForCausalLM if cfg.model == "gpt-neo" else RobertaForMaskedLM)(
        family_config(cfg, vocab_size, tokenizer))
    return patch_for_run(model, cfg, grid)


def non_embedding_parameters(cfg: TrainConfig) -> int:
    """The non-embedding parameter count of cfg's model (the vocabulary does not change it), built on the meta
    device: no memory, no initialisation, milliseconds."""
    with torch.device("meta"):
        total, embedding = parameter_counts(fresh_model(cfg, vocab_size=64))
    return total - embedding


def patch_for_run(model: torch.nn.Module, cfg: TrainConfig, grid) -> torch.nn.Module:
    """A vanilla GPT-Neo/RoBERTa with the run's activations and feed-forward; `grid` (the run's or a stage II bank's
    settings) gives the spline grid."""
    return patch_model(model, af_type=cfg.af_type, layer_specific=cfg.af_layer_specific, ffn_type=cfg.ffn_type,
                       af_range=grid.af_range, af_n_anchors=grid.af_n_anchors, af_init=cfg.af_init,
                       kan_grid_size=cfg.kan_grid_size, kan_spline_order=cfg.kan_spline_order,
                       kan_grid_range=cfg.kan_grid_range, kan_width=cfg.kan_width)


def family_config(cfg: TrainConfig, vocab_size: int, tokenizer: PreTrainedTokenizerBase | None) -> PretrainedConfig:
    """The vanilla GPTNeoConfig / RobertaConfig of a run (before patching): its shape, vocabulary and special ids."""
    h, layers, heads = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
    width = cfg.intermediate_size or 4 * h
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if cfg.model == "gpt-neo":
        config = GPTNeoConfig(
            vocab_size=vocab_size, hidden_size=h, num_layers=layers, num_heads=heads, intermediate_size=width,
            attention_types=[[["global"], layers]], max_position_embeddings=cfg.seq_length, resid_dropout=0.0,
            embed_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=True,
            bos_token_id=special["bos_token_id"], eos_token_id=special["eos_token_id"])
        config._attn_implementation = "eager"  # the only attention transformers has for GPT-Neo
        return config
    config = RobertaConfig(
        vocab_size=vocab_size, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=width, max_position_embeddings=cfg.seq_length + 2,  # positions start after the pad id
        type_vocab_size=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-5,
        tie_word_embeddings=True, **special)
    config._attn_implementation = "sdpa"
    return config


def load_model(cfg: TrainConfig, run_data: RunData) -> torch.nn.Module:
    """cfg.model_name_or_path, which must be of cfg.model's family; a vanilla GPT-Neo/RoBERTa is patched with the
    run's activation settings, a patched one keeps its own."""
    family = FAMILY[cfg.model]
    model = AfGPTForCausalLM.from_pretrained(cfg.model_name_or_path) if cfg.model == "afgpt" else \
        family.auto_class.from_pretrained(cfg.model_name_or_path)
    check_model_type(cfg, model.config.model_type)
    if cfg.model != "afgpt" and not is_patched(model):
        model = patch_for_run(model, cfg, cfg)
    if model.config.vocab_size < run_data.vocab_size:
        raise ValueError(
            f"model {cfg.model_name_or_path} has vocab_size {model.config.vocab_size} but the tokenizer has "
            f"{run_data.vocab_size} tokens: use the tokenizer the model was trained with")
    return model


def check_model_type(cfg: TrainConfig, model_type: str) -> None:
    """A saved model continued with --model-name-or-path must be of --model's family."""
    if model_type not in FAMILY[cfg.model].model_types:
        other = next((name for name, family in FAMILY.items() if model_type in family.model_types), None)
        fix = f"pass --model {other}" if other else "train it with its own code"
        raise ValueError(f"model_name_or_path={cfg.model_name_or_path!r} is a {model_type!r} model, not a "
                         f"{cfg.model} model (--model {cfg.model}): {fix}, or drop --model-name-or-path")


def check_family_inputs(cfg: TrainConfig) -> None:
    """Before any work: a saved model of another family, and a RoBERTa tokenizer without <mask> and friends."""
    path = Path(cfg.model_name_or_path).expanduser() if cfg.model_name_or_path else None
    if path is not None and (path / "config.json").is_file():
        check_model_type(cfg, json.loads((path / "config.json").read_text()).get("model_type"))
    if cfg.model != "roberta":
        return
    if cfg.data.endswith(".bin"):
        record = shard_record(cfg)
        source = cfg.tokenizer or (record[0] if record else None)
        if source is None:
            raise ValueError("roberta needs a tokenizer with a mask token, but the .bin shards have no tokens.json "
                             "record (so they are taken to be GPT-2 tokens, which have none): make the shards with "
                             "`afgpt prepare --tokenizer <roberta-base folder>`, or pass that --tokenizer")
    elif cfg.tokenizer:
        source = cfg.tokenizer
    else:
        return  # the BPE trained for the run has RoBERTa's special tokens
    check_masked_lm_tokenizer(data_lib.load_tokenizer(source), str(source))


def check_masked_lm_tokenizer(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """RoBERTa's masked LM needs a mask token (and <s>, </s>, <pad>) in its tokenizer."""
    missing = [token for token in MASKED_LM_SPECIAL_TOKENS if getattr(tokenizer, token, None) is None]
    if missing:
        raise ValueError(
            f"tokenizer {name} has no {', '.join(missing)}, which RoBERTa's masked LM needs (GPT-2's tokenizer has no "
            "mask token): use roberta-base's tokenizer (--tokenizer <roberta-base folder>), or drop --tokenizer to "
            "train a BPE with <s> <pad> </s> <unk> <mask>")


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(all, embedding) parameters, each tensor counted once (tied heads once). Embedding parameters are those of
    the token, position and token-type embeddings and an untied output head (weight and its vocabulary bias)."""
    embedding = {id(p): p for module in model.modules() if isinstance(module, torch.nn.Embedding)
                 for p in module.parameters(recurse=False)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        embedding.update({id(p): p for p in head.parameters(recurse=False)})
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in embedding.values())


def describe_model(model: torch.nn.Module, cfg: TrainConfig) -> str:
    """The run log's model line: parameter split, family, shape and activations."""
    total, embedding = parameter_counts(model)
    settings = find_activation_set(model).settings
    size = f"size {cfg.size}, " if cfg.size else ""
    return (f"model: {total:,} parameters ({embedding:,} embedding, {total - embedding:,} non-embedding), "
            f"{cfg.model} ({FAMILY[cfg.model].objective} LM), {size}hidden {settings.hidden_size}, "
            f"{settings.num_hidden_layers} layers, af_type {settings.af_type}, ffn {cfg.ffn_type}")


def kan_parameters(model: torch.nn.Module) -> int:
    """Parameters of the model's KAN feed-forwards (0 without)."""
    return sum(p.numel() for module in model.modules() if isinstance(module, KANFeedForward)
               for p in module.parameters())
