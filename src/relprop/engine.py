"""Forward pass, attention gradients and relevance propagation over an `Architecture`.

The engine does only the work an explanation needs:

* the last block is evaluated for the pooled token(s) only (the classifier reads nothing
  else), unless the caller asks for every query row;
* autograd starts at the lowest block whose attention gradient is needed;
* relevance propagation stops at the lowest block whose attention relevance is needed,
  unless relevance at the input is wanted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .architecture import Architecture, Block
from .rules import RuleSet, clone_rule, matmul_rule, select_rule


@dataclass
class BlockRecord:
    """What one block's relevance propagation needs from its forward pass.

    Only tensors that cannot be recomputed cheaply are kept; the others are recomputed
    with the forward's own operations (bit-identical) when the propagation reaches them.
    Without relevance (``kept=False``) only the attention is kept.
    """

    block: Block
    rows: Optional[torch.Tensor]     # query rows computed (None = all)
    attention: torch.Tensor          # [B, H, R, N]
    mask: Optional[torch.Tensor] = None     # additive key mask [B, 1, 1, N]
    x_in: Optional[torch.Tensor] = None
    q: Optional[torch.Tensor] = None        # [B, H, R, dh]
    k: Optional[torch.Tensor] = None        # [B, H, N, dh]
    v: Optional[torch.Tensor] = None        # [B, H, N, dh]
    context: Optional[torch.Tensor] = None  # [B, R, D]
    x_mid: Optional[torch.Tensor] = None
    fc1_out: Optional[torch.Tensor] = None  # before the activation
    products: Optional[dict[str, torch.Tensor]] = None   # x @ W.T of the output projections

    def _biased(self, name: str) -> torch.Tensor:
        bias = getattr(self.block, name).bias
        return self.products[name] if bias is None else self.products[name] + bias

    def product(self, name: str) -> torch.Tensor:
        """``x @ W.T`` of a linear layer. For the layers whose output autograd keeps anyway
        (q, k, v, fc1) it is recovered from that output instead of being stored twice."""
        if name in self.products:
            return self.products[name]
        out = {"query": self.q, "key": self.k, "value": self.v}.get(name)
        out = self.fc1_out if out is None else _merge_heads(out)
        bias = getattr(self.block, name).bias
        return out if bias is None else out - bias

    @property
    def attn_in(self) -> torch.Tensor:
        return self.block.norm1(self.x_in) if self.block.pre_norm else self.x_in

    @property
    def residual(self) -> torch.Tensor:
        return self.x_in if self.rows is None else self.x_in[:, self.rows]

    @property
    def scores(self) -> torch.Tensor:
        return (self.q @ self.k.transpose(-1, -2)) * self.q.shape[-1] ** -0.5

    @property
    def attn_out(self) -> torch.Tensor:
        return self._biased("out")

    @property
    def fc1_in(self) -> torch.Tensor:
        return self.block.norm2(self.x_mid) if self.block.pre_norm else self.x_mid

    @property
    def hidden(self) -> torch.Tensor:
        return self.block.activation(self.fc1_out)

    @property
    def mlp_out(self) -> torch.Tensor:
        return self._biased("fc2")


@dataclass
class ForwardPass:
    logits: torch.Tensor
    records: list[BlockRecord]
    head_inputs: list[list[torch.Tensor]]   # per branch: the pooled token, then each layer's input
    head_products: list[list[torch.Tensor]]
    branch_logits: list[torch.Tensor]
    pooled_rows: dict[int, int]             # token index -> row of the last block's output
    last_rows: int                          # rows of the last block's output
    num_tokens: int


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.reshape(b, n, num_heads, d // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)


def _block_forward(block: Block, x_in: torch.Tensor, mask: Optional[torch.Tensor],
                   rows: Optional[torch.Tensor], keep: bool) -> tuple[torch.Tensor, BlockRecord]:
    attn_in = block.norm1(x_in) if block.pre_norm else x_in
    q_in = attn_in if rows is None else attn_in[:, rows]
    products = {}

    def linear(name, x):
        products[name], out = getattr(block, name).with_preactivation(x)
        return out

    q = _split_heads(block.query(q_in), block.num_heads)
    k = _split_heads(block.key(attn_in), block.num_heads)
    v = _split_heads(block.value(attn_in), block.num_heads)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    masked_scores = scores + mask if block.masked else scores
    attention = masked_scores.softmax(dim=-1)
    context = _merge_heads(attention @ v)
    attn_out = linear("out", context)
    residual = x_in if rows is None else x_in[:, rows]
    x_mid = residual + attn_out
    if not block.pre_norm:
        x_mid = block.norm1(x_mid)
    fc1_in = block.norm2(x_mid) if block.pre_norm else x_mid
    fc1_out = block.fc1(fc1_in)
    hidden = block.activation(fc1_out)
    mlp_out = linear("fc2", hidden)
    x_out = x_mid + mlp_out
    if not block.pre_norm:
        x_out = block.norm2(x_out)
    if not keep:
        return x_out, BlockRecord(block, rows, attention)
    return x_out, BlockRecord(block, rows, attention, mask if block.masked else None, x_in, q, k, v, context,
                              x_mid, fc1_out, products)


def _head_forward(arch: Architecture, x: torch.Tensor, pooled_rows: dict[int, int]):
    logits, inputs, products = [], [], []
    for branch in arch.head:
        z = x[:, pooled_rows[branch.token]]
        branch_inputs, branch_products = [z], []
        for i, layer in enumerate(branch.layers):
            product, z = layer.with_preactivation(z)
            branch_products.append(product)
            if i < len(branch.layers) - 1:
                if branch.activations[i] is not None:
                    z = branch.activations[i](z)
                branch_inputs.append(z)
        logits.append(z)
        inputs.append(branch_inputs)
        products.append(branch_products)
    out = logits[0] if len(logits) == 1 else sum(logits) / len(logits)
    return out, logits, inputs, products


def key_mask_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask [B, 1, 1, N]: 0 for valid keys, the dtype's minimum otherwise."""
    return ((~valid).to(dtype) * torch.finfo(dtype).min)[:, None, None, :]


def forward(arch: Architecture, hidden: torch.Tensor, valid: torch.Tensor, *,
            grad_from: Optional[int] = None, all_rows: bool = False, keep: bool = True) -> ForwardPass:
    """Run the blocks and the head; ``keep``: record what relevance propagation needs.

    ``grad_from``: index of the first block whose attention needs a gradient; autograd
    tracks the computation from that block's input on.
    """
    mask = key_mask_bias(valid, hidden.dtype)
    pooled = arch.pooled_tokens
    last = len(arch.blocks) - 1
    records = []
    x = hidden
    for index, block in enumerate(arch.blocks):
        if grad_from is not None and index == grad_from:
            x = x.detach().requires_grad_(True)
        rows = None
        if index == last and not all_rows:
            rows = torch.tensor(pooled, device=x.device)
        x, record = _block_forward(block, x, mask, rows, keep)
        records.append(record)
    if arch.final_norm is not None:
        x = arch.final_norm(x)
    pooled_rows = {t: (pooled.index(t) if not all_rows else t) for t in pooled}
    logits, branch_logits, head_inputs, head_products = _head_forward(arch, x, pooled_rows)
    return ForwardPass(logits, records, head_inputs, head_products, branch_logits, pooled_rows, x.shape[1], hidden.shape[1])


def attention_gradients(fwd: ForwardPass, target: torch.Tensor, blocks: list[int]) -> dict[int, torch.Tensor]:
    """Gradient of each sample's target logit w.r.t. the attention probabilities of ``blocks``.

    Samples are independent, so the gradient of the summed target logits is per sample.
    """
    score = fwd.logits.gather(1, target[:, None]).sum()
    grads = torch.autograd.grad(score, [fwd.records[i].attention for i in blocks])
    return dict(zip(blocks, grads))


def _scatter_rows(values: torch.Tensor, rows: Optional[torch.Tensor], num_tokens: int) -> torch.Tensor:
    if rows is None:
        return values
    full = values.new_zeros(values.shape[0], num_tokens, *values.shape[2:])
    full[:, rows] = values
    return full


@dataclass
class Relevance:
    attention: dict[int, torch.Tensor] = field(default_factory=dict)   # block -> R_A [B, H, R, N]
    encoder_input: Optional[torch.Tensor] = None                       # [B, N, D]


def _head_relevance(arch: Architecture, fwd: ForwardPass, rules: RuleSet, one_hot: torch.Tensor) -> torch.Tensor:
    """Relevance of the last block's output rows, from a one-hot at the target logits."""
    branch_relevance = [one_hot]
    if len(arch.head) == 2:
        # logits = (z1 + z2) / 2: an addition of the two halves
        z1, z2 = fwd.branch_logits
        branch_relevance = list(rules.add(z1 / 2, z2 / 2, one_hot))
    elif len(arch.head) > 2:
        raise NotImplementedError("heads with more than two branches")
    first_input = fwd.head_inputs[0][0]
    out = first_input.new_zeros(first_input.shape[0], fwd.last_rows, first_input.shape[-1])
    for branch, inputs, products, rel in zip(arch.head, fwd.head_inputs, fwd.head_products, branch_relevance):
        for layer, x, product in zip(reversed(branch.layers), reversed(inputs), reversed(products)):
            rel = rules.linear(x, layer.weight, rel, product)
        out[:, fwd.pooled_rows[branch.token]] += select_rule(inputs[0], rel)
    return out


def propagate(arch: Architecture, fwd: ForwardPass, target: torch.Tensor, rules: RuleSet, *,
              lowest_block: int, to_input: bool = False) -> Relevance:
    """LRP from a one-hot of 1 at ``target`` down to block ``lowest_block`` (or the input).

    Consumes the records it passes (only their attention is left), to bound memory.
    """
    one_hot = torch.zeros_like(fwd.logits)
    one_hot.scatter_(1, target[:, None], 1.0)
    result = Relevance()
    relevance = _head_relevance(arch, fwd, rules, one_hot)
    for index in range(len(arch.blocks) - 1, lowest_block - 1, -1):
        block, rec = arch.blocks[index], fwd.records[index]
        rel_x_mid, rel_mlp = rules.add(rec.x_mid, rec.mlp_out, relevance)
        rel_hidden = rules.linear(rec.hidden, block.fc2.weight, rel_mlp, rec.product("fc2"))
        rel_fc1_in = rules.linear(rec.fc1_in, block.fc1.weight, rel_hidden, rec.product("fc1"))
        rel_x_mid = clone_rule(rec.x_mid, rel_x_mid, rel_fc1_in)
        rel_residual, rel_attn_out = rules.add(rec.residual, rec.attn_out, rel_x_mid)
        rel_context = rules.linear(rec.context, block.out.weight, rel_attn_out, rec.product("out"))
        rel_attention, rel_v = matmul_rule(rec.attention, rec.v, _split_heads(rel_context, block.num_heads))
        result.attention[index] = rel_attention
        # the propagation never comes back to this block: keep only its attention
        fwd.records[index] = BlockRecord(block, rec.rows, rec.attention)
        if index == lowest_block and not to_input:
            break
        rel_scores = rel_attention
        if block.masked:
            scores = rec.scores
            rel_scores, _ = rules.add(scores, rec.mask.expand_as(scores), rel_attention)
        rel_q, rel_k_t = matmul_rule(rec.q, rec.k.transpose(-1, -2), rel_scores)
        num_tokens = rec.x_in.shape[1]
        attn_in = rec.attn_in
        q_in = attn_in if rec.rows is None else attn_in[:, rec.rows]
        rel_q_in = _scatter_rows(rules.linear(q_in, block.query.weight, _merge_heads(rel_q), rec.product("query")),
                                 rec.rows, num_tokens)
        rel_k_in = rules.linear(attn_in, block.key.weight, _merge_heads(rel_k_t.transpose(-1, -2)),
                                rec.product("key"))
        rel_v_in = rules.linear(attn_in, block.value.weight, _merge_heads(rel_v), rec.product("value"))
        if block.qkv_fork == "clone":
            rel_attn_in = clone_rule(attn_in, rel_q_in, rel_k_in, rel_v_in)
        else:
            rel_attn_in = rel_q_in + rel_k_in + rel_v_in
        relevance = clone_rule(rec.x_in, _scatter_rows(rel_residual, rec.rows, num_tokens), rel_attn_in)
    if to_input:
        result.encoder_input = relevance
    return result
