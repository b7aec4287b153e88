"""A BERT encoder's inference forward on packed inputs: the student's fast path when it is a BERT.

HF's forward pads every input of a batch to the longest one, and its matmuls then work on the padding too:
on small batches of random lengths (what a served replica gets) that is about half of their work. Here the
inputs' tokens are concatenated into one (tokens, hidden) matrix for every matmul, LayerNorm and GELU, and
padded only inside attention, which is where the inputs must be kept apart. The query, key and value
projections are fused into one matmul. The result is HF's `last_hidden_state`, mean-pooled per input and
L2-normalised, as `RetrievalStudent` pools it (tests/test_store_student.py compares the two).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supports(encoder: torch.nn.Module) -> bool:
    """Whether `encoder` is an HF BertModel this forward reproduces (absolute positions, GELU, an encoder)."""
    config = getattr(encoder, "config", None)
    return (
        type(encoder).__name__ == "BertModel"
        and getattr(config, "model_type", None) == "bert"
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
        and getattr(config, "hidden_act", None) == "gelu"
        and not getattr(config, "is_decoder", False)
    )


class PackedBert:
    """The weights of a BertModel (in their dtype), fused for the packed forward; `embed` pools and normalises."""

    def __init__(self, encoder: torch.nn.Module):
        embeddings = encoder.embeddings
        self.word, self.position = embeddings.word_embeddings.weight, embeddings.position_embeddings.weight
        self.token_type = embeddings.token_type_embeddings.weight
        self.embedding_norm = embeddings.LayerNorm
        self.heads = encoder.config.num_attention_heads
        self.layers = []
        for layer in encoder.encoder.layer:
            attention = layer.attention.self
            qkv_weight = torch.cat([attention.query.weight, attention.key.weight, attention.value.weight])
            qkv_bias = torch.cat([attention.query.bias, attention.key.bias, attention.value.bias])
            self.layers.append(
                (
                    qkv_weight.detach().contiguous(),
                    qkv_bias.detach().contiguous(),
                    layer.attention.output.dense,
                    layer.attention.output.LayerNorm,
                    layer.intermediate.dense,
                    layer.output.dense,
                    layer.output.LayerNorm,
                )
            )

    @torch.no_grad()
    def embed(self, features: list[dict], device: torch.device) -> torch.Tensor:
        """(B, hidden) float32: the mean of each input's last hidden states over its tokens, L2-normalised.
        `features`: per input its `input_ids` (and `token_type_ids` when the tokenizer gives them), unpadded."""
        lengths = torch.tensor([len(feature["input_ids"]) for feature in features], device=device)
        count, longest = len(features), int(lengths.max())
        ids = torch.tensor([i for feature in features for i in feature["input_ids"]], device=device)
        types = torch.tensor(
            [t for feature in features for t in feature.get("token_type_ids", [0] * len(feature["input_ids"]))],
            device=device,
        )
        sequence = torch.repeat_interleave(torch.arange(count, device=device), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        positions = torch.arange(len(ids), device=device) - starts[sequence]
        # where each token sits in the (count, longest) padded layout that attention uses
        slots = sequence * longest + positions
        keep = (torch.arange(longest, device=device)[None] < lengths[:, None])[:, None, None, :]

        x = self.embedding_norm(self.word[ids] + self.position[positions] + self.token_type[types])
        hidden = x.shape[-1]
        head_dim = hidden // self.heads
        for qkv_weight, qkv_bias, out, out_norm, up, down, ffn_norm in self.layers:
            qkv = F.linear(x, qkv_weight, qkv_bias)
            padded = qkv.new_zeros(count * longest, 3 * hidden)
            padded[slots] = qkv
            q, k, v = padded.view(count, longest, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            context = context.transpose(1, 2).reshape(count * longest, hidden)[slots]
            x = out_norm(out(context) + x)
            x = ffn_norm(down(F.gelu(up(x))) + x)
        pooled = torch.zeros(count, hidden, device=device).index_add_(0, sequence, x.float())
        return F.normalize(pooled / lengths[:, None].float(), dim=-1)
