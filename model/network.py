"""The DeepSeek-V2 network: MLA attention + DeepSeekMoE, in the Hugging Face DeepseekV2 layout.

Parameter names equal transformers' DeepseekV2ForCausalLM (routed experts as 3-D params),
so the same weights load in both; `checkpoint.py` converts to the per-expert names on disk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import DeepseekV2Config, GenerationConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .attention import MLA, LatentCache
from .logprobs import chunked_logprobs
from .moe import MLP, MoE, RoutedExperts, Router
from .norm import RMSNorm
from .rope import RotaryEmbedding

# The additive mask's "minus infinity": finite in float32 AND bfloat16. finfo(float32).min rounds to -inf in
# bf16 (autocast casts the mask too), and a query whose keys are all masked (a left-padded row) then gets
# softmax(-inf, ..., -inf) = NaN on some kernels; with a finite value it gets a harmless uniform row.
MASKED = torch.finfo(torch.bfloat16).min


def moe_layer_indices(config) -> list[int]:
    """Decoder layers that are MoE (the others are dense MLPs): those from first_k_dense_replace on.
    Routing capture and replay are indexed by position in this list, not by decoder layer."""
    if getattr(config, "n_routed_experts", None) is None:
        return []
    return [i for i in range(config.num_hidden_layers) if i >= (getattr(config, "first_k_dense_replace", 0) or 0)]


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(config, layer_idx)
        self.is_moe = layer_idx in moe_layer_indices(config)
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rotation, mask, token_mask, cache: LatentCache | None = None, replay=None,
                count_load: bool = True, segments=None):
        h = self.input_layernorm(x)
        x = x + (self.self_attn(h, rotation, mask) if cache is None else self.self_attn.decode(h, rotation, mask, cache))
        h = self.post_attention_layernorm(x)
        if not self.is_moe:
            return x + self.mlp(h), None, {}
        y, indices, losses = self.mlp(h, token_mask, replay, count_load=count_load, segments=segments)
        return x + y, indices, losses


class Backbone(nn.Module):
    """Embeddings, decoder stack and final norm (the `model.` prefix of checkpoints)."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False  # set by PreTrainedModel.gradient_checkpointing_enable()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, routed_experts=None, **kwargs) -> "BackboneOutput":
        """HF-style base-model call (TRL's fused LM-head loss calls it directly): masks built here."""
        B, T = input_ids.shape
        segments = None
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
            else:  # left or right padding: positions count valid tokens
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        elif attention_mask is None and bool((position_ids[:, 1:] == 0).any()):
            segments = (position_ids == 0).long().cumsum(-1)      # padding-free packing (TRL)
        token_mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        mask = causal_mask(attention_mask, position_ids, T, segments=segments)
        hidden, routed, losses = self.run(input_ids, mask, position_ids, token_mask, replay=routed_experts,
                                          segments=segments)
        return BackboneOutput(last_hidden_state=hidden, routed_experts=tuple(routed), balance_losses=losses)

    def run(self, input_ids, mask, position_ids, token_mask, cache=None, replay=None, segments=None):
        """The decoder stack on prepared masks: (hidden [B, T, D], routed experts per MoE layer, balance losses).
        segments [B, T]: packed sequences (1-based per row); the MoE's per-sequence terms follow them."""
        x = self.embed_tokens(input_ids)                                            # [B, T, D]
        rotation = self.rotary(position_ids)                                        # [B, T, d_R/2]
        routed, losses = [], {}
        moe_i = 0
        for layer in self.layers:
            layer_replay = None
            if layer.is_moe and replay is not None:  # per-layer list, or one tensor [B, n_moe_layers, T, k]
                layer_replay = replay[:, moe_i] if torch.is_tensor(replay) and replay.dim() == 4 else replay[moe_i]
            if self.gradient_checkpointing and self.training and cache is None:  # recompute in backward
                x, indices, layer_losses = torch.utils.checkpoint.checkpoint(
                    layer, x, rotation, mask, token_mask, None, layer_replay, False, segments, use_reentrant=False)
                if layer.is_moe:                  # counted here, once: the recompute would count again
                    layer.mlp.record_load(indices, token_mask)
            else:
                x, indices, layer_losses = layer(x, rotation, mask, token_mask, cache, layer_replay,
                                                 segments=segments)
            if layer.is_moe:
                routed.append(indices)
                moe_i += 1
            for k, v in layer_losses.items():
                losses[k] = losses.get(k, 0.0) + v
        return self.norm(x), routed, losses


def causal_mask(attention_mask: torch.Tensor | None, position_ids: torch.Tensor, T: int, S: int | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
    """Additive mask [B, 1, T, S]: query t (at absolute slot S-T+t) sees valid keys at slots <= its own."""
    S = S or T
    B = position_ids.shape[0]
    q_slot = torch.arange(S - T, S, device=position_ids.device)
    allowed = q_slot[:, None] >= torch.arange(S, device=position_ids.device)[None, :]   # [T, S]
    allowed = allowed[None].expand(B, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :S].bool()
    if segments is not None:  # packed sequences attend only within their own segment
        allowed = allowed & (segments[:, :, None] == segments[:, None, :])
    return torch.where(allowed, 0.0, MASKED)[:, None]


@dataclass
class BackboneOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    routed_experts: tuple | None = None
    balance_losses: dict | None = None


@dataclass
class LMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    balance_losses: dict | None = None
    routed_experts: tuple | None = None
    hidden_states: torch.Tensor | None = None
    token_logprobs: torch.Tensor | None = None     # [B, T-1] when forward(logprob_labels=...) was asked
    token_entropy: torch.Tensor | None = None      # [B, T-1]


class DeepseekV2PreTrained(PreTrainedModel):
    config_class = DeepseekV2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _keys_to_ignore_on_load_unexpected = [r"rotary\.inv_freq"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, Router):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RoutedExperts):
            module.gate_up_proj.normal_(0.0, std)
            module.down_proj.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)

    def router_stats(self) -> list[dict]:
        """Per MoE layer: load fraction per expert and max/mean load, since the last reset."""
        stats = []
        for i, layer in enumerate(self.model.layers):
            if layer.is_moe:
                load = layer.mlp.load
                frac = load / load.sum().clamp(min=1)
                stats.append({"layer": i, "load": frac.tolist(),
                              "max_over_mean": float(load.max() / load.mean().clamp(min=1e-9))})
        return stats

    def reset_router_stats(self) -> None:
        for layer in self.model.layers:
            if layer.is_moe:
                layer.mlp.load.zero_()

    def set_token_dropping(self, capacity_factor: float | None, per_sequence: bool = True) -> None:
        """Turn capacity-based token dropping (training mode only) on with this factor, or off with None;
        per_sequence computes capacity per sequence (see moe.capacity_keep). The config is left as saved."""
        for layer in self.model.layers:
            if layer.is_moe:
                layer.mlp.capacity_factor = capacity_factor
                layer.mlp.capacity_per_sequence = per_sequence

    def update_routing_bias(self, speed: float) -> None:
        """V3's auxiliary-loss-free balancing, from the load seen since the last reset; then resets it."""
        for layer in self.model.layers:
            if layer.is_moe:
                layer.mlp.update_bias(speed)
        self.reset_router_stats()

    def save_pretrained(self, save_directory, state_dict=None, **kwargs) -> None:
        from .checkpoint import save_checkpoint
        save_checkpoint(self, save_directory, state_dict=state_dict)


class DeepseekV2LM(DeepseekV2PreTrained):
    """Causal LM. forward(input_ids, attention_mask, position_ids).logits; also balance losses and routing."""

    _tied_weights_keys = None
    hf_architecture = "DeepseekV2ForCausalLM"

    def __init__(self, config: DeepseekV2Config):
        super().__init__(config)
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.generation_config = GenerationConfig.from_model_config(config)  # read by TRL and generate()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                routed_experts=None, return_routing: bool = False, logits_to_keep: int = 0,
                logprob_labels: torch.Tensor | None = None, logprob_chunk_tokens: int = 4096,
                temperature: float = 1.0, **kwargs) -> LMOutput:
        """logprob_labels [B, T-1] (the shifted input_ids): instead of logits, return log p(label) and the
        entropy at each position t < T-1, computed chunk by chunk from the hidden states (model.logprobs):
        no [B, T, V] tensor exists at any time, forward or backward."""
        out = self.model(input_ids, attention_mask, position_ids, routed_experts)
        hidden, routed, losses = out.last_hidden_state, out.routed_experts, out.balance_losses
        if logprob_labels is not None:
            logp, ent = chunked_logprobs(hidden[:, :-1], self.lm_head.weight, logprob_labels,
                                         logprob_chunk_tokens, temperature)
            return LMOutput(aux_loss=sum(losses.values()) if losses else None, balance_losses=losses or None,
                            routed_experts=tuple(routed) if return_routing else None,
                            token_logprobs=logp, token_entropy=ent)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        aux = sum(losses.values()) if losses else None
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            if aux is not None:
                loss = loss + aux
        return LMOutput(loss=loss, logits=logits, aux_loss=aux, balance_losses=losses or None,
                        routed_experts=tuple(routed) if return_routing else None)

    @torch.no_grad()
    def decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor,
                    cache: LatentCache) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Absorbed-MLA step: new tokens [B, T] at positions [B, T]; key_mask [B, S] marks valid cache slots
        (S = cache.length + T). Returns last-position logits [B, V] and routed experts per MoE layer."""
        T = input_ids.shape[1]
        S = cache.length + T
        mask = causal_mask(key_mask, position_ids, T, S)
        hidden, routed, _ = self.model.run(input_ids, mask, position_ids, key_mask[:, -T:].bool(), cache=cache)
        cache.length = S
        return self.lm_head(hidden[:, -1]).float(), routed

    def new_cache(self, batch: int, max_len: int) -> LatentCache:
        p = next(self.parameters())
        return LatentCache(self.config.num_hidden_layers, batch, max_len, self.config.kv_lora_rank,
                           self.config.qk_rope_head_dim, dtype=p.dtype, device=p.device)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """HF-style generate on the absorbed-MLA decode path: returns [B, prompt + new] token ids."""
        from .generate import hf_style_generate
        return hf_style_generate(self, input_ids, attention_mask, **kwargs)


class DeepseekV2RewardModel(DeepseekV2PreTrained):
    """Sequence classifier on the last non-pad token: the layout of transformers' DeepseekV2ForSequenceClassification."""

    hf_architecture = "DeepseekV2ForSequenceClassification"

    def __init__(self, config: DeepseekV2Config):
        super().__init__(config)
        self.num_labels = getattr(config, "num_labels", 1)
        self.model = Backbone(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels=None, **kwargs) -> LMOutput:
        out = self.model(input_ids, attention_mask, position_ids)
        hidden, losses = out.last_hidden_state, out.balance_losses
        logits = self.score(hidden)                                                 # [B, T, L]
        pad = self.config.pad_token_id
        if pad is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        else:  # rightmost token that is not padding, as transformers pools it
            not_pad = (input_ids != pad).long() * torch.arange(input_ids.shape[1], device=input_ids.device)
            last = not_pad.argmax(-1)
        pooled = logits[torch.arange(input_ids.shape[0], device=input_ids.device), last]  # [B, L]
        return LMOutput(logits=pooled, aux_loss=sum(losses.values()) if losses else None)
