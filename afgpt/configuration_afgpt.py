"""AfGPT configuration: a small modern GPT whose activation functions are a research variable."""
from transformers import PreTrainedConfig

from .activation_set import check_settings
from .activations import parse_af_spec
from .ffn import check_ffn_activation, check_ffn_settings


class AfGPTConfig(PreTrainedConfig):
    """Configuration of an AfGPT model; defaults follow idiap/lm-afs (4 layers, 4 heads, width 256).

    The activation fields:
        af_type: "<mlp>;att-<att>" spec, e.g. "gelu;att-linear" (baseline) or "spline;att-spline".
        af_layer_specific: 0 one activation per slot shared by all layers, 1 one per layer,
            2 first and last layers own theirs and the middle layers share one.
        af_range, af_n_anchors: spline anchors evenly spaced on [-af_range, af_range].
        af_init: initial constant value of splines, or -1 to start as the identity.
        doc_separator_token_id: when set, attention does not cross documents (tokens after a
            separator do not see tokens before it), as in lm-afs training.
        context_size: sliding attention window in tokens (None = full causal attention).
        ffn_type: "mlp" (fc, activation, proj), "glu" (proj(act(gate(x)) * up(x)), width 2/3 of
            intermediate_size so the parameters match the MLP's; see afgpt.ffn) or "kan" (two B-spline KAN layers
            whose base function is the MLP activation; see afgpt.kan), with kan_grid_size (intervals), kan_spline_order, kan_grid_range
            and kan_width ("params": hidden width matching the MLP's parameter count, "mlp": intermediate_size).
    """

    model_type = "afgpt"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 50304
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int | None = None
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True
    af_type: str = "gelu;att-linear"
    af_layer_specific: int = 1
    af_range: float = 15.0
    af_n_anchors: int = 64
    af_init: float = 0.01
    ffn_type: str = "mlp"
    kan_grid_size: int = 5
    kan_spline_order: int = 3
    kan_grid_range: tuple[float, float] | list[float] = (-1.0, 1.0)
    kan_width: str = "params"
    doc_separator_token_id: int | None = None
    context_size: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        self.af_range = float(self.af_range)
        self.af_init = float(self.af_init)
        self._check_fields()
        super().__post_init__(**kwargs)

    def _check_fields(self) -> None:
        """Fail at construction, naming the field, the value and what is allowed."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: it must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}: pick a head count that divides the width")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(
                f"head size hidden_size/num_attention_heads={self.hidden_size // self.num_attention_heads} "
                "is odd: rotary embeddings need an even head size")
        check_settings(self)
        check_ffn_settings(self)
        check_ffn_activation(self.ffn_type, parse_af_spec(self.af_type))
        if self.context_size is not None and (not isinstance(self.context_size, int) or self.context_size < 1):
            raise ValueError(f"context_size={self.context_size!r} is invalid: use a positive window or None")
        if self.doc_separator_token_id is not None and not 0 <= self.doc_separator_token_id < self.vocab_size:
            raise ValueError(
                f"doc_separator_token_id={self.doc_separator_token_id!r} is outside the vocabulary "
                f"[0, {self.vocab_size}): use the tokenizer's end-of-document id or None")


__all__ = ["AfGPTConfig"]
