"""Shared-prefix batches: the token prefixes that rows of a micro-batch have in common are computed once.

Instruction data repeats itself: a preamble, a system prompt, a tool schema or an earlier turn starts many
rows. :func:`share_prefixes` lays a micro-batch out as one packed row holding the rows' *prefix tree*
(a compressed trie): every distinct prefix appears once, in depth-first order,

    [shared prefix][rest of row 1][rest of row 2]...        (one common prefix)

and a token attends to the tokens of its own row only: its tree ancestors, and causally the tokens before
it in its own node. Positions are the positions the token has in its row, so a rest continues from the
prefix's length. The loss is taken at the packed positions that predict each row's supervised tokens
(``loss_positions``, targets in ``labels``): a prediction made from a shared token is listed once per row
that shares it, so with ``train_on_prompt`` a shared prompt token counts once per row, as in separate rows.
Loss and gradients are those of the rows trained separately (``tests/test_prefix_sharing.py``).

A batch built here holds:

* ``input_ids``, ``position_ids`` ``[1, T]`` (T: the tokens of the tree),
* ``attention_mask`` ``[1, 1, T, T]`` bool, True where a query token may attend to a key token (transformers
  uses a 4-D mask as given; ``sdpa`` takes it as is, ``eager`` as an additive mask, see :func:`attention_mask_for`),
  or, for block-sparse attention (``compact=True``), the tree itself: ``tree_nodes`` ``[1, T]`` (each token's
  node) and ``tree_ancestors`` ``[n, n]`` bool (``[d, a]``: node ``a`` is node ``d`` or one of its ancestors),
* ``loss_positions`` ``[1, N]`` and ``labels`` = ``shift_labels`` ``[1, N]``: the N supervised predictions
  (transformers counts ``shift_labels`` for the loss normalization across gradient accumulation),
* ``rows`` and ``row_tokens`` (Python ints: the rows and the tokens they hold), ``use_cache=False``.

On a GPU the attention is block-sparse: with ``torch_varlen`` (the package's attention, see
:mod:`hf_instruct_tune.packing`) or transformers' ``flex_attention``, :func:`shared_prefix_loss` turns the
compact tree into a FlexAttention ``BlockMask`` (:func:`tree_block_mask`): only the blocks of token pairs that the
tree lets through are computed, so attention costs about the pairs a row attends, not ``T**2``, and no
``T x T`` mask is ever built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
MASK_ATTENTIONS = {"sdpa", "eager"}
"""Attention implementations that take an explicit 4-D mask (flash and varlen kernels ignore masks)."""
BLOCK_MASK_ATTENTIONS = {"torch_varlen", "flex_attention"}
"""Attention implementations that take a FlexAttention ``BlockMask`` (``torch_varlen``: :mod:`.packing`)."""
SHARING_KEYS = ("loss_positions", "shift_labels", "rows", "row_tokens", "tree_nodes", "tree_ancestors")
"""Keys of a shared-prefix batch that are not model inputs."""


@dataclass
class PrefixTree:
    """The prefix tree of a micro-batch: nodes in depth-first order, each a run of tokens."""

    tokens: list[int] = field(default_factory=list)  # the packed row
    positions: list[int] = field(default_factory=list)  # each packed token's position in its rows
    node_of_token: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # per node; -1 for a root
    row_index: list[list[int]] = field(default_factory=list)  # per row: the packed index of each of its tokens

    def add_node(self, parent: int, run: Sequence[int], start: int) -> int:
        node = len(self.parents)
        self.parents.append(parent)
        self.tokens.extend(run)
        self.positions.extend(range(start, start + len(run)))
        self.node_of_token.extend([node] * len(run))
        return node

    def ancestors(self) -> torch.Tensor:
        """``[n, n]`` bool: ``[d, a]`` is True when node ``a`` is node ``d`` or one of its ancestors."""
        n = len(self.parents)
        ancestors = torch.zeros((n, n), dtype=torch.bool)
        for node, parent in enumerate(self.parents):  # parents come before their children
            if parent >= 0:
                ancestors[node] = ancestors[parent]
            ancestors[node, node] = True
        return ancestors

    def attention_mask(self) -> torch.Tensor:
        """``[T, T]`` bool: query ``q`` sees key ``k`` when ``k``'s node is ``q``'s node or one of its ancestors
        and ``k <= q``."""
        return dense_tree_mask(torch.tensor(self.node_of_token, dtype=torch.long), self.ancestors())

    def attended_pairs(self) -> int:
        """The (query, key) pairs the tree's mask lets through: a token at position ``p`` sees the ``p + 1`` tokens
        of its row up to itself."""
        return sum(self.positions) + len(self.positions)


def build_prefix_tree(rows: Sequence[Sequence[int]]) -> PrefixTree:
    """The compressed trie of ``rows`` (token lists): each distinct prefix once, children in order of rows."""
    tree = PrefixTree(row_index=[[0] * len(row) for row in rows])
    stack = [(list(range(len(rows))), 0, -1)]  # (rows sharing tokens[:depth], depth, parent node)
    while stack:
        group, depth, parent = stack.pop()
        first = rows[group[0]]
        end = depth
        if len(group) == 1:
            end = len(first)
        else:
            while all(len(rows[r]) > end and rows[r][end] == first[end] for r in group):
                end += 1
        if end > depth:
            offset = len(tree.tokens)
            parent = tree.add_node(parent, first[depth:end], depth)
            for r in group:
                tree.row_index[r][depth:end] = range(offset, offset + end - depth)
        children: dict[int, list[int]] = {}
        for r in group:
            if len(rows[r]) > end:
                children.setdefault(rows[r][end], []).append(r)
        stack.extend((child, end, parent) for child in reversed(list(children.values())))
    return tree


def share_prefixes(features: Sequence[Mapping[str, Sequence[int]]], tree: PrefixTree | None = None, *,
                   compact: bool = False) -> dict[str, Any]:
    """One shared-prefix batch (see the module docstring) from encoded examples (``input_ids``, ``labels``).

    ``tree``: the examples' :func:`build_prefix_tree`, when already built. ``compact``: carry the tree
    (``tree_nodes``, ``tree_ancestors``) instead of the dense ``attention_mask``, for block-sparse attention.
    """
    if not features:
        raise ValueError("`features` should hold at least one example, got an empty list.")
    rows = [list(feature["input_ids"]) for feature in features]
    tree = tree if tree is not None else build_prefix_tree(rows)
    positions, targets = [], []
    for r, feature in enumerate(features):
        labels = list(feature["labels"])
        if len(labels) != len(rows[r]):
            raise ValueError(f"Example {r}: `labels` should have the length of `input_ids` ({len(rows[r])}), "
                             f"got {len(labels)}.")
        for t in range(len(labels) - 1):
            if labels[t + 1] != IGNORE_INDEX:
                positions.append(tree.row_index[r][t])
                targets.append(labels[t + 1])
    targets_tensor = torch.tensor([targets], dtype=torch.long)
    attention = ({"tree_nodes": torch.tensor([tree.node_of_token], dtype=torch.long),
                  "tree_ancestors": tree.ancestors()} if compact else {"attention_mask": tree.attention_mask()[None, None]})
    return {
        "input_ids": torch.tensor([tree.tokens], dtype=torch.long),
        "position_ids": torch.tensor([tree.positions], dtype=torch.long),
        **attention,
        "loss_positions": torch.tensor([positions], dtype=torch.long),
        "labels": targets_tensor,
        "shift_labels": targets_tensor,
        "rows": len(rows),  # ints, not tensors: moved to the GPU, reading them back would wait for the queue
        "row_tokens": sum(map(len, rows)),
        "use_cache": False,
    }


def sharing_pays(lengths: Sequence[int], tree_tokens: int, *, attention_tokens: int, packed: bool = False,
                 tree_pairs: int | None = None) -> bool:
    """Whether one shared row of ``tree_tokens`` costs clearly less than the usual layout of ``lengths``.

    The shared prefixes must save a tenth of the rows' tokens, and the cost must drop by a tenth. Cost of a row:
    its tokens (the linear layers) plus its attention work over ``attention_tokens``, about ``6 * hidden_size``
    (per-token matmul work over per-pair attention work). With an explicit mask attention computes every pair,
    ``T**2``; with block-sparse attention (``tree_pairs`` given: :meth:`PrefixTree.attended_pairs`) it computes
    the pairs a row attends, and the usual layout's varlen or flash kernels their causal half, ``T * (T + 1) / 2``.
    The usual layout is padding to the longest row, or with ``packed`` isolated packing.
    """
    if len(lengths) < 2 or tree_tokens > 0.9 * sum(lengths):
        return False
    if tree_pairs is None:
        shared = tree_tokens + tree_tokens**2 / attention_tokens

        def pairs(n: int) -> float:
            return n * n
    else:
        shared = tree_tokens + tree_pairs / attention_tokens

        def pairs(n: int) -> float:
            return n * (n + 1) / 2
    if packed:
        usual = sum(lengths) + sum(map(pairs, lengths)) / attention_tokens
    else:
        longest = max(lengths)
        usual = len(lengths) * (longest + pairs(longest) / attention_tokens)
    return shared < 0.9 * usual


def attention_mask_for(mask: torch.Tensor, attn_implementation: str | None, dtype: torch.dtype) -> Any:
    """The bool ``[B, 1, T, T]`` mask in the form the model's attention takes: bool for ``sdpa``, additive
    for ``eager``."""
    if attn_implementation == "eager":
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return additive.masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def dense_tree_mask(nodes: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    """``[T, T]`` bool from a compact tree: ``ancestors[nodes[q], nodes[kv]] & (kv <= q)``."""
    length = nodes.numel()
    causal = torch.ones((length, length), dtype=torch.bool, device=nodes.device).tril()
    return ancestors[nodes][:, nodes] & causal


def tree_block_mask(nodes: torch.Tensor, ancestors: torch.Tensor, *, block_size: int = 128) -> Any:
    """The FlexAttention ``BlockMask`` of one packed tree row, on the tensors' device.

    ``mask_mod(b, h, q, kv) = ancestors[nodes[q], nodes[kv]] & (kv <= q)`` (``nodes``: ``[T]``, each token's
    node; ``ancestors``: ``[n, n]``). Which blocks of ``block_size`` x ``block_size`` pairs are computed, and which
    of them need no mask, comes from the tree in ``O(T + (T / block_size)**2)``, never from a ``T x T`` mask: in
    the depth-first layout of :func:`share_prefixes` a node's subtree is one run of tokens, so the queries that see
    a key token ``kv`` are those from ``kv`` up to the end of its node's subtree.
    """
    from torch.nn.attention.flex_attention import BlockMask

    nodes = nodes.reshape(-1)
    device, length = nodes.device, nodes.numel()
    index = torch.arange(length, device=device)
    last = torch.full((ancestors.shape[0],), -1, dtype=torch.long, device=device)
    last = last.scatter_reduce(0, nodes, index, reduce="amax")  # each node's last token
    subtree_end = torch.where(ancestors, last[:, None], -1).amax(0) + 1  # [a]: after a's last descendant
    ends = subtree_end[nodes]  # per key token: the first query that no longer sees it
    blocks = -(-length // block_size)
    padding = blocks * block_size - length
    most = F.pad(ends, (0, padding), value=0).view(blocks, block_size).amax(1)
    least = F.pad(ends, (0, padding), value=length).view(blocks, block_size).amin(1)
    starts = torch.arange(blocks, device=device) * block_size
    stops = (starts + block_size).clamp(max=length)
    query_block, key_block = torch.arange(blocks, device=device)[:, None], torch.arange(blocks, device=device)[None]
    before, diagonal = key_block < query_block, key_block == query_block
    whole = (stops - starts == block_size)[:, None]  # a block with padding in it is never full (as torch makes them)
    full = (before & whole & (least[None] >= stops[:, None])) | (diagonal & (block_size == 1))
    partial = ((before & (most[None] > starts[:, None])) | diagonal) & ~full

    def mask_mod(b, h, q, kv):
        return ancestors[nodes[q], nodes[kv]] & (kv <= q)

    def sparse(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = chosen.sum(-1, dtype=torch.int32)
        order = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # chosen first, in order
        return counts[None, None], order[None, None]

    (kv_num_blocks, kv_indices), (full_num_blocks, full_indices) = sparse(partial), sparse(full)
    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, full_num_blocks, full_indices, BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod, seq_lengths=(length, length))


def tree_attention_mask(inputs: dict[str, Any], attn_implementation: str | None, dtype: torch.dtype) -> Any:
    """Take the batch's tree out of ``inputs`` (compact or dense) and return the mask the model's attention takes:
    a ``BlockMask`` for :data:`BLOCK_MASK_ATTENTIONS`, else the dense mask of :func:`attention_mask_for`."""
    nodes, ancestors = inputs.pop("tree_nodes", None), inputs.pop("tree_ancestors", None)
    dense = inputs.pop("attention_mask", None)
    if attn_implementation in BLOCK_MASK_ATTENTIONS:
        if nodes is not None:
            return tree_block_mask(nodes, ancestors)
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, kv):
            return dense[0, 0, q, kv]

        length = dense.shape[-1]
        return create_block_mask(mask_mod, None, None, length, length, device=dense.device)
    if dense is None:
        dense = dense_tree_mask(nodes.reshape(-1), ancestors)[None, None]
    return attention_mask_for(dense, attn_implementation, dtype)


def attention_tokens_for(model: Any) -> int:
    """``6 * hidden_size`` of ``model``'s config (see :func:`sharing_pays`); 4096 when it has none."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(getattr(config, "text_config", None), "hidden_size", None)
    return 6 * int(hidden) if hidden else 4096


@dataclass
class SharingStats:
    """Tokens that shared-prefix batches held in their rows and computed, for the log."""

    batches: int = 0
    row_tokens: int = 0
    computed_tokens: int = 0

    def summary(self) -> str:
        saved = self.row_tokens - self.computed_tokens
        share = saved / self.row_tokens if self.row_tokens else 0.0
        return (f"Prefix sharing: {self.batches} micro-batches shared their prefixes; computed "
                f"{self.computed_tokens:,} tokens for {self.row_tokens:,} in their rows ({saved:,} saved, {share:.0%})")


def shared_prefix_loss(model: Any, inputs: dict[str, Any], *, head: Any = None, softcap: float | None = None,
                       num_items_in_batch: Any = None, num_processes: int = 1,
                       stats: SharingStats | None = None, implementation: str = "auto") -> tuple[torch.Tensor, Any]:
    """The causal-LM loss of a shared-prefix batch, normalized like transformers' (``num_items_in_batch``).

    ``head``: the ``lm_head`` when the model returns hidden states (fused loss), else None (it returns logits);
    ``implementation``: the fused loss's kernel (see :func:`~hf_instruct_tune.loss.fused_cross_entropy`).
    Returns ``(loss, outputs)``.
    """
    from .loss import normalized_loss, predictions_cross_entropy

    positions = inputs.pop("loss_positions")[0]
    targets = inputs.pop("labels")[0]
    inputs.pop("shift_labels", None)
    rows, row_tokens = int(inputs.pop("rows", 0)), int(inputs.pop("row_tokens", 0))
    config = getattr(model, "config", None)
    dtype = getattr(model, "dtype", None) or torch.float32
    inputs["attention_mask"] = tree_attention_mask(inputs, getattr(config, "_attn_implementation", None), dtype)
    inputs["use_cache"] = False
    # the head runs only at the supervised positions: a row's other tokens need no logits
    inputs["logits_to_keep"] = positions.to(inputs["input_ids"].device)
    outputs = model(**inputs)
    chosen = outputs.logits[0]
    if head is not None:
        loss = predictions_cross_entropy(chosen, head.weight, targets, bias=head.bias, softcap=softcap,
                                         num_items_in_batch=num_items_in_batch, num_processes=num_processes,
                                         implementation=implementation)
    else:
        total = F.cross_entropy(chosen.float(), targets.to(chosen.device), ignore_index=IGNORE_INDEX, reduction="sum")
        loss = normalized_loss(total, targets, num_items_in_batch, num_processes)
    if stats is not None and model.training and rows:
        stats.batches += 1
        stats.row_tokens += row_tokens
        stats.computed_tokens += int(inputs["input_ids"].numel())
    return loss, outputs


def merged_micro_batches(batch_size: int, grad_accum: int, longest: int, *, budget: int = 16384) -> tuple[int, int]:
    """``(batch_size, grad_accum)`` for the CPU: one micro-batch per optimizer step when its rows fit ``budget``
    tokens unshared.

    The optimizer steps see the same rows (the sampler's order is the same, cut into steps of
    ``batch_size * grad_accum``) and the same loss (it is normalized by the step's supervised tokens), while a
    larger micro-batch shares its prefixes among more rows.
    """
    merged = batch_size * grad_accum
    if grad_accum > 1 and merged * longest <= budget:
        return merged, 1
    return batch_size, grad_accum
