"""AfGPT: the lm-afs GPT (RMSNorm, rotary, QK-norm, value residual, U-Net skips, tied embeddings)
as a transformers model whose activation functions are a research variable.

Activations live in one place, the model's activation set `AfGPTModel.activations` (`mlp.<slot>`,
`att.<slot>`), and layers apply theirs through slots that look them up there (afgpt.activation_set).
Sharing an activation across layers is therefore structural: each parameter is stored once and
survives save_pretrained/from_pretrained. The feed-forward comes from the registry in afgpt.ffn.
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import and_masks, create_causal_mask, create_masks_for_generate, sliding_window_overlay
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .activation_set import ActivationSet, ActivationSettings, AttentionSlot, SlotActivation, init_activation_module
from .configuration_afgpt import AfGPTConfig
from .ffn import FFNSettings, build_ffn, init_ffn_module
from .losses import linear_cross_entropy


class AfGPTRotaryEmbedding(nn.Module):
    """Rotary position embedding for given positions: (cos, sin with its first half negated), the form
    `rotate` takes, computed once per forward for all layers.

    Angles are always computed in fp32 and cast once to the activations' dtype, so a model cast to bf16
    gets the same rotation from explicit positions as from the table (no inverse frequencies are stored:
    a bf16 copy of them would be off by 0.15 in cos at position 1000).

    Positions 0 .. max_position_embeddings - 1 are also kept as a table: consecutive positions (training,
    generation) are a slice of it. Besides saving the trigonometry, this keeps torch.compile from
    recomputing cos and sin inside every kernel that uses them, forward and backward (4% of a step).
    """

    def __init__(self, config: AfGPTConfig):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.base = config.rope_theta
        self.max_positions = config.max_position_embeddings
        cos, sin_signed = self.compute_table()
        self.register_buffer("cos_table", cos, persistent=False)
        self.register_buffer("sin_table", sin_signed, persistent=False)

    def compute_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / self.base ** exponents

    def compute_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_sin(torch.arange(self.max_positions, dtype=torch.float32), self.compute_inv_freq())

    @staticmethod
    def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None] * inv_freq
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin_signed = self.cos_sin(position_ids.float(), self.compute_inv_freq(x.device))
        return cos.to(x.dtype), sin_signed.to(x.dtype)

    @torch.no_grad()
    def consecutive(self, x: torch.Tensor, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions start .. start + length - 1 for every sequence: a slice of the table when it covers them."""
        end = start + length
        if end > self.cos_table.shape[0]:
            return self(x, torch.arange(start, end, device=x.device)[None])
        return self.cos_table[None, start:end].to(x.dtype), self.sin_table[None, start:end].to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (halves rotated as pairs) in three kernels: x * cos + rotate_half(x) * sin is
    x * cos + x.roll(half) * sin_signed, with sin's first half negated; cos and sin_signed broadcast against x."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; the path that can return attention weights."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


class AfGPTAttention(nn.Module):
    """Causal self-attention with QK-norm, rotary, value residual and an optional activation slot
    before QKV: x + f(a*x + b) (lm-afs)."""

    def __init__(self, config: AfGPTConfig, layer_idx: int, activations: ActivationSet):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.num_key_value_groups = 1
        width = config.hidden_size
        self.pre_activation = AttentionSlot(activations, layer_idx) if activations.att is not None else None
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)
        self.o_proj.zero_init = True
        self.value_lambda = nn.Parameter(torch.tensor(0.5))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        value_first: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(output, attention weights or None, the first layer's values for the value residual)."""
        x = hidden_states if self.pre_activation is None else self.pre_activation(hidden_states)
        batch, seq, _ = x.shape
        shape = (batch, seq, self.num_heads, self.head_dim)
        # QK-norm and rotary on q and k side by side ([batch, seq, 2 * heads, head_dim]): one kernel per
        # step for both, before the transpose to [batch, heads, seq, head_dim]
        qk = torch.cat((self.q_proj(x), self.k_proj(x)), dim=-1).view(batch, seq, 2 * self.num_heads, self.head_dim)
        cos, sin = position_embeddings
        qk = rotate(F.rms_norm(qk, (self.head_dim,)), cos[:, :, None], sin[:, :, None])
        q, k = qk.transpose(1, 2).split(self.num_heads, dim=1)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if value_first is None:
            value_first = v
        v = torch.lerp(v, value_first, self.value_lambda.to(v.dtype))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)

        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward)
        output, weights = attention(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs)
        output = self.o_proj(output.reshape(batch, seq, -1))
        return output, weights, value_first


class AfGPTBlock(GradientCheckpointingLayer):
    """Pre-norm block that first mixes its input with the embedding output x0 (U-Net lambdas)."""

    def __init__(self, config: AfGPTConfig, layer_idx: int, activations: ActivationSet):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = AfGPTAttention(config, layer_idx, activations)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = build_ffn(FFNSettings.from_config(config), SlotActivation(activations, "mlp", layer_idx))
        self.block_lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(
        self,
        hidden_states: torch.Tensor,
        x0: torch.Tensor,
        value_first: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, the first layer's values); the output is what `output_hidden_states` records."""
        lambdas = self.block_lambdas.to(hidden_states.dtype)
        x = torch.addcmul(hidden_states * lambdas[0], x0, lambdas[1])  # lambdas[0] * h + lambdas[1] * x0
        attn_out, _, value_first = self.attn(
            self.attn_norm(x), position_embeddings, attention_mask, value_first=value_first, cache=cache, **kwargs)
        x = x + attn_out
        x = x + self.mlp(self.mlp_norm(x))
        return x, value_first


class AfGPTPreTrainedModel(PreTrainedModel):
    config_class = AfGPTConfig
    config: AfGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["AfGPTBlock"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": AfGPTBlock, "attentions": AfGPTAttention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """lm-afs initialisation: N(0, 0.02) weights, zero output projections, identity norms."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "zero_init", False):
                init.zeros_(module.weight)
            else:
                init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, AfGPTRotaryEmbedding):
            cos, sin_signed = module.compute_table()
            init.copy_(module.cos_table, cos)
            init.copy_(module.sin_table, sin_signed)
        elif init_activation_module(module, init) or init_ffn_module(module):
            pass
        elif isinstance(module, AfGPTAttention):
            init.constant_(module.value_lambda, 0.5)
        elif isinstance(module, AfGPTBlock):
            init.copy_(module.block_lambdas, torch.tensor([1.0, 0.0]))
        elif isinstance(module, AfGPTModel):
            init.ones_(module.skip_weights)

    def load_activations(self, bank: nn.Module, freeze: bool = True) -> "AfGPTPreTrainedModel":
        """Put learned activations (an `afgpt.ActivationBank`) into this model; frozen by default (stage II)."""
        return bank.load_into(self, freeze=freeze)


class AfGPTModel(AfGPTPreTrainedModel):
    """The AfGPT trunk: embedding + LayerNorm, U-Net stack of blocks, no final norm (lm-afs)."""

    def __init__(self, config: AfGPTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        activations = ActivationSet(ActivationSettings.from_config(config))
        self.layers = nn.ModuleList(AfGPTBlock(config, i, activations) for i in range(config.num_hidden_layers))
        self.activations = activations
        self.rotary_emb = AfGPTRotaryEmbedding(config)
        self.num_encoder_layers = (config.num_hidden_layers + 1) // 2
        self.skip_weights = nn.Parameter(torch.ones(config.num_hidden_layers - self.num_encoder_layers))
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _attention_mask(self, input_ids, inputs_embeds, attention_mask, cache, position_ids):
        """Causal mask, restricted to the sliding window and to each document."""
        overlays = []
        if self.config.context_size is not None:
            overlays.append(sliding_window_overlay(self.config.context_size))
        if self.config.doc_separator_token_id is not None:
            doc_ids = document_ids(input_ids, inputs_embeds, cache, self.config.doc_separator_token_id)
            last = doc_ids.shape[1] - 1  # a static cache asks about slots not filled yet: the causal mask hides them

            def same_document(batch_idx, head_idx, q_idx, kv_idx):
                return doc_ids[batch_idx, q_idx] == doc_ids[batch_idx, kv_idx.clamp(max=last)]

            overlays.append(same_document)
        return create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            and_mask_function=and_masks(*overlays) if overlays else None,
        )

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        check_kwargs(kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if (input_ids is not None and input_ids.numel() and not torch.compiler.is_compiling()
                and int(input_ids.max()) >= self.config.vocab_size):  # a host sync: skipped while compiling
            raise ValueError(
                f"token id {int(input_ids.max())} >= vocab_size {self.config.vocab_size}: "
                "the tokenizer does not match this model")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        past = cache.get_seq_length() if cache is not None else 0
        consecutive = position_ids is None
        if consecutive:
            position_ids = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        mask = self._attention_mask(input_ids, inputs_embeds, attention_mask, cache, position_ids)

        x = x0 = self.embed_norm(inputs_embeds)
        if consecutive:
            position_embeddings = self.rotary_emb.consecutive(x, past, inputs_embeds.shape[1])
        else:
            position_embeddings = self.rotary_emb(x, position_ids)
        value_first, skips = None, []
        for i, layer in enumerate(self.layers):
            if i >= self.num_encoder_layers:
                x = torch.addcmul(x, skips.pop(), self.skip_weights[i - self.num_encoder_layers].to(x.dtype))
            x, value_first = layer(x, x0, value_first, position_embeddings, mask, cache=cache, **kwargs)
            if i < self.num_encoder_layers:
                skips.append(x)
        return BaseModelOutputWithPast(last_hidden_state=x, cache=cache)


DOCUMENT_IDS = "afgpt_document_ids"  # the cache attribute holding the document index of every cached token


def document_ids(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor, cache: Cache | None,
                 separator: int) -> torch.Tensor:
    """The document index of every position seen so far, cached tokens first: [batch, past + new].

    A separator token starts a new document. A cache does not keep token ids, so the indices of the tokens it
    holds are kept on the cache itself (and cropped with it), which keeps document masking exact when a
    sequence is fed in pieces or generated. Embeddings without ids stay in the current document.
    """
    past = cache.get_seq_length() if cache is not None else 0
    batch, length = inputs_embeds.shape[:2]
    previous = getattr(cache, DOCUMENT_IDS, None) if past else None
    if past and (previous is None or previous.shape[1] < past or previous.shape[0] != batch):
        raise ValueError(
            f"this cache holds {past} tokens that AfGPT did not see with doc_separator_token_id set (or for another "
            "batch): feed the whole prefix through this model with use_cache=True to build the cache")
    previous = previous[:, :past] if past else torch.zeros(batch, 0, dtype=torch.long, device=inputs_embeds.device)
    last = previous[:, -1:] if past else torch.zeros(batch, 1, dtype=torch.long, device=inputs_embeds.device)
    if input_ids is None:
        new = last.expand(batch, length)
    else:
        new = last + (input_ids == separator).cumsum(-1)
    ids = torch.cat((previous, new), dim=1)
    if cache is not None:
        setattr(cache, DOCUMENT_IDS, ids)
    return ids


# Loss and output keywords a forward takes besides TransformersKwargs; anything else is a mistake worth naming.
EXTRA_KWARGS = frozenset({"shift_labels", "ignore_index", "return_dict"})


def check_kwargs(kwargs: dict) -> None:
    """Reject keyword arguments no AfGPT forward uses, instead of passing them on silently."""
    unknown = set(kwargs) - set(TransformersKwargs.__annotations__) - EXTRA_KWARGS
    if unknown:
        raise TypeError(f"AfGPT forward got unexpected keyword argument(s) {sorted(unknown)}")


@dataclass
class AfGPTCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus `accuracy`, the next-token accuracy of a fused training loss."""

    accuracy: torch.FloatTensor | None = None


class AfGPTForCausalLM(AfGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: AfGPTConfig):
        super().__init__(config)
        self.model = AfGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if not config.tie_word_embeddings:
            self.lm_head.zero_init = True  # lm-afs: an untied head starts at zero
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> AfGPTCausalLMOutput:
        """Labels follow transformers (the loss shifts them); pass `shift_labels` for pre-shifted targets.

        With labels in training mode the loss is fused with the LM head (`linear_cross_entropy`) and
        the logits are never materialized: `logits` is None, `accuracy` holds the next-token accuracy,
        and `lm_head`'s forward (and its hooks) do not run. A wrapped head (PEFT) keeps the plain path.
        `skip_logits` overrides the choice, as in Liger-Kernel.
        """
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, return_dict=True, **kwargs)
        hidden = outputs.last_hidden_state
        has_labels = labels is not None or kwargs.get("shift_labels") is not None
        fusable = has_labels and type(self.lm_head) is nn.Linear
        if skip_logits is None:
            skip_logits = self.training and fusable
        if skip_logits and not fusable:
            raise ValueError("skip_logits=True needs labels (or shift_labels) and a plain nn.Linear lm_head; "
                             "pass labels, or skip_logits=False for a wrapped head")
        loss = logits = accuracy = None
        if skip_logits:
            loss, accuracy = self._fused_loss(hidden, labels, **kwargs)
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep])
            if has_labels:
                if kwargs.get("shift_labels") is not None:
                    kwargs["shift_labels"] = kwargs["shift_labels"].contiguous()  # the loss views it flat
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return AfGPTCausalLMOutput(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
                                   attentions=outputs.attentions, accuracy=accuracy)

    def create_masks_for_generate(self, config: AfGPTConfig, inputs_embeds: torch.Tensor,
                                  attention_mask: torch.Tensor | None, cache: Cache | None, **kwargs):
        """generate() precomputes 4D masks for static caches without the token ids that document masking needs:
        with documents or a window, hand the 2D mask on and let forward build the full one."""
        if config.doc_separator_token_id is None and config.context_size is None:
            return create_masks_for_generate(config, inputs_embeds, attention_mask, cache, **kwargs)
        return attention_mask

    @staticmethod
    def _reorder_cache(cache: Cache, beam_idx: torch.LongTensor) -> Cache:
        """Beam search: reorder the cache and the document indices AfGPT keeps on it."""
        cache.reorder_cache(beam_idx)
        ids = getattr(cache, DOCUMENT_IDS, None)
        if ids is not None:
            setattr(cache, DOCUMENT_IDS, ids.index_select(0, beam_idx.to(ids.device)))
        return cache

    def _fused_loss(self, hidden: torch.Tensor, labels: torch.Tensor | None, shift_labels: torch.Tensor | None = None,
                    num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100,
                    **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' ForCausalLMLoss (same shifting and reduction) computed by linear_cross_entropy."""
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shift_labels = shift_labels.reshape(-1).to(hidden.device)
        loss_sum, correct = linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, shift_labels, ignore_index)
        n_valid = (shift_labels != ignore_index).sum()
        if num_items_in_batch is None:
            loss = loss_sum / n_valid
        else:
            loss = loss_sum / (num_items_in_batch.to(hidden.device) if torch.is_tensor(num_items_in_batch)
                               else num_items_in_batch)
        return loss, correct / n_valid.clamp_min(1)


class AfGPTForSequenceClassification(AfGPTPreTrainedModel):
    """Classifies from the last non-padding token, like GPT-2."""

    def __init__(self, config: AfGPTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = AfGPTModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, return_dict=True, **kwargs)
        logits = self.score(outputs.last_hidden_state)
        batch = logits.shape[0]
        last = self._last_token(input_ids, batch)
        pooled = logits[torch.arange(batch, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled, cache=outputs.cache,
                                                hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def _last_token(self, input_ids: torch.Tensor | None, batch: int) -> torch.Tensor | int:
        pad = self.config.pad_token_id
        if pad is None:
            if batch != 1:
                raise ValueError("batches of more than one sequence need config.pad_token_id to find each last token")
            return -1
        if input_ids is None:
            return -1
        not_pad = (input_ids != pad).int()
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32)
        return (positions * not_pad).argmax(-1)


__all__ = ["AfGPTModel", "AfGPTForCausalLM", "AfGPTForSequenceClassification", "AfGPTPreTrainedModel"]
