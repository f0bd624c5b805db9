"""The in-place KV cache of a "shared_buffer" artifact (graphs/shared_kv.py): allocated once, written in place.

Per request, every layer's key and value is one buffer (batch, num_heads, capacity, head_size) allocated at the
start, bound through IO binding as both the past input and the present output of GroupQueryAttention, which
writes each new K/V at slot `lengths[b]` of its row: a decode step moves no cache bytes at all.

Rows are right-padded inside the cache (row b holds its real tokens in slots 0..lengths[b]-1), while the
generation loop keeps transformers' left-padded view (mask, position ids): `prefill` converts once. Position ids
are the same in both views (the count of real tokens before a token), so logits match the default graph's.

```
 left-padded prompt (B, L) ──right-align──▶ input_ids (B, L), seqlens_k = len-1, logits_index = len-1
 decode: input_ids (B, 1), position_ids (B, 1), seqlens_k = lengths, total = max(lengths) + 1
```
"""

import numpy as np
import onnxruntime as ort


class SharedKVCache:
    """One request's preallocated cache.

    Args:
        pairs: (past name, present name) per tensor.
        batch, num_heads, head_size: the cache geometry.
        capacity: slots per row (longest prompt + max_new_tokens).
        dtype: numpy kv dtype.
        device: "cpu" or "cuda".
        device_id: the CUDA device.
    """

    def __init__(self, pairs, batch, num_heads, head_size, capacity, dtype, device="cpu", device_id=0):
        self.pairs, self.capacity, self.device, self.device_id = pairs, capacity, device, device_id
        shape = (batch, num_heads, capacity, head_size)  # (B, nh, capacity, hs)
        self.buffers = {past: ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, device_id)
                        for past, _ in pairs}
        self.lengths = np.zeros(batch, dtype=np.int32)  # real tokens cached per row
        self.started = False

    @property
    def length(self) -> int:
        """Cached positions of the longest row."""
        return int(self.lengths.max()) if self.started else 0

    def reorder(self, indices) -> None:
        """Beam search: row i becomes old row indices[i], buffers and lengths (the batch may grow).

        Copies every buffer through the host into fresh buffers: the one place this cache moves bytes.
        """
        indices = np.asarray(indices, dtype=np.int64)
        self.buffers = {past: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(buffer.numpy()[indices]),
                                                               self.device, self.device_id)
                        for past, buffer in self.buffers.items()}
        self.lengths = self.lengths[indices]

    def bind(self, binding: ort.IOBinding) -> None:
        """Bind every buffer as its layer's past input and present output (the same memory)."""
        for past, present in self.pairs:
            binding.bind_ortvalue_input(past, self.buffers[past])
            binding.bind_ortvalue_output(present, self.buffers[past])


def right_align(input_ids: np.ndarray, attention_mask: np.ndarray, pad_token_id: int):
    """Left-padded (B, L) ids and mask -> right-padded ids, positions 0.., and the real length per row."""
    lengths = attention_mask.sum(axis=1).astype(np.int64)  # (B,)
    length = input_ids.shape[1]
    ids = np.full_like(input_ids, pad_token_id)
    for b, n in enumerate(lengths):
        ids[b, :n] = input_ids[b, length - n:]
    positions = np.broadcast_to(np.arange(length, dtype=np.int64), input_ids.shape).copy()  # pads: any value
    return ids, positions, lengths


def shared_step(session: ort.InferenceSession, cache: SharedKVCache, input_ids: np.ndarray,
                attention_mask: np.ndarray, position_ids: np.ndarray, pad_token_id: int) -> np.ndarray:
    """One prefill (first call) or decode step of a shared_buffer graph; returns (B, 1, vocab) logits.

    Args:
        input_ids, attention_mask, position_ids: the loop's left-padded view, as for the default graph.
        pad_token_id: fills the right padding at prefill (never attended to).
    Raises:
        ValueError: the cache is full (the loop sizes it, so this is a bug, not a user error).
    """
    if not cache.started:
        ids, positions, lengths = right_align(input_ids, attention_mask, pad_token_id)
        seqlens, total, index = lengths - 1, ids.shape[1], lengths - 1
    else:
        ids, positions, lengths = input_ids, position_ids, cache.lengths.astype(np.int64) + 1
        seqlens, total, index = lengths - 1, int(lengths.max()), np.zeros(len(ids), dtype=np.int64)
    if total > cache.capacity:
        raise ValueError(f"KV cache of {cache.capacity} slots is full")
    binding = session.io_binding()
    for name, array in (("input_ids", ids), ("position_ids", positions),
                        ("seqlens_k", seqlens.astype(np.int32)),
                        ("total_sequence_length", np.array(total, dtype=np.int32)),
                        ("logits_index", np.ascontiguousarray(index, dtype=np.int64))):
        binding.bind_cpu_input(name, np.ascontiguousarray(array))
    binding.bind_output("logits")  # host memory: (B, 1, vocab), the only bytes that come back; output 0
    cache.bind(binding)
    session.run_with_iobinding(binding)
    cache.lengths, cache.started = lengths.astype(np.int32), True
    return binding.get_outputs()[0].numpy()
