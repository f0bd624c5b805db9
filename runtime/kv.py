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

On CPU the decode steps of a request share one IO binding, made at its first decode step (`DecodeBinding`): the
small inputs and the logits are numpy arrays bound by pointer, written in place each step, and the cache buffers
are bound once; a step is then a few element writes and `run_with_iobinding`, with no binding, OrtValue or logits
array built per token.
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
        self.dtype, self.row_shape = np.dtype(dtype), [1, num_heads, capacity, head_size]
        self.buffers = {past: ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, device_id)
                        for past, _ in pairs}
        self.lengths = np.zeros(batch, dtype=np.int32)  # real tokens cached per row
        self.started = False
        self.decode_binding = None  # DecodeBinding, made at the first decode step (CPU)

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
        self.decode_binding = None  # bound to the old buffers and batch

    def bind(self, binding: ort.IOBinding) -> None:
        """Bind every buffer as its layer's past input and present output (the same memory)."""
        for past, present in self.pairs:
            binding.bind_ortvalue_input(past, self.buffers[past])
            binding.bind_ortvalue_output(present, self.buffers[past])

    def bind_row(self, binding: ort.IOBinding, row: int) -> None:
        """Bind row `row` of every buffer alone, as a batch of one, past input and present output.

        Speculative decoding's verify step at batch > 1 runs row by row: GroupQueryAttention takes several new
        tokens after a past at batch 1 only. A row of (B, nh, capacity, hs) is contiguous, so it is a pointer
        and a shape: no cache byte is copied.
        """
        offset = row * int(np.prod(self.row_shape)) * self.dtype.itemsize
        for past, present in self.pairs:
            pointer = self.buffers[past].data_ptr() + offset
            binding.bind_input(past, self.device, self.device_id, self.dtype, self.row_shape, pointer)
            binding.bind_output(present, self.device, self.device_id, self.dtype, self.row_shape, pointer)


def right_align(input_ids: np.ndarray, attention_mask: np.ndarray, pad_token_id: int):
    """Left-padded (B, L) ids and mask -> right-padded ids, positions 0.., and the real length per row."""
    lengths = attention_mask.sum(axis=1).astype(np.int64)  # (B,)
    length = input_ids.shape[1]
    ids = np.full_like(input_ids, pad_token_id)
    for b, n in enumerate(lengths):
        ids[b, :n] = input_ids[b, length - n:]
    positions = np.broadcast_to(np.arange(length, dtype=np.int64), input_ids.shape).copy()  # pads: any value
    return ids, positions, lengths


class DecodeBinding:
    """One request's decode-step binding on CPU: inputs and logits are numpy arrays bound by pointer.

    Args:
        session: the shared_buffer graph's session.
        cache: the request's SharedKVCache (its buffers are bound once, as past input and present output).
        vocab: the logits' last dimension.
        logits_dtype: numpy dtype of the logits output.
    """

    def __init__(self, session: ort.InferenceSession, cache: SharedKVCache, vocab: int, logits_dtype):
        batch = len(cache.lengths)
        self.ids = np.zeros((batch, 1), dtype=np.int64)  # (B, 1)
        self.positions = np.zeros((batch, 1), dtype=np.int64)  # (B, 1)
        self.seqlens = np.zeros(batch, dtype=np.int32)  # (B,)
        self.total = np.zeros((), dtype=np.int32)
        self.index = np.zeros(batch, dtype=np.int64)  # (B,): the step's only position
        self.logits = np.empty((batch, 1, vocab), dtype=logits_dtype)  # (B, 1, vocab)
        self.binding = session.io_binding()
        for name, array in (("input_ids", self.ids), ("position_ids", self.positions), ("seqlens_k", self.seqlens),
                            ("total_sequence_length", self.total), ("logits_index", self.index)):
            self.binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        self.binding.bind_output("logits", "cpu", 0, self.logits.dtype, list(self.logits.shape),
                                 self.logits.ctypes.data)
        cache.bind(self.binding)


def shared_step(session: ort.InferenceSession, cache: SharedKVCache, input_ids: np.ndarray,
                attention_mask: np.ndarray, position_ids: np.ndarray, pad_token_id: int,
                logits_meta: tuple | None = None) -> np.ndarray:
    """One prefill (first call) or decode step of a shared_buffer graph; returns (B, 1, vocab) logits.

    Args:
        input_ids, attention_mask, position_ids: the loop's left-padded view, as for the default graph.
        pad_token_id: fills the right padding at prefill (never attended to).
        logits_meta: (vocab, numpy dtype) of the logits: one-token decode steps on CPU then run through the request's
            `DecodeBinding`, and the logits returned are its array, overwritten by the next step of this cache
            (copy them to keep them). None: a fresh binding per step.
    Raises:
        ValueError: the cache is full (the loop sizes it, so this is a bug, not a user error).
    """
    if cache.started and logits_meta is not None and cache.device == "cpu" and input_ids.shape[1] == 1:
        return _bound_decode(session, cache, input_ids, position_ids, logits_meta)
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


def _bound_decode(session, cache: SharedKVCache, input_ids, position_ids, logits_meta) -> np.ndarray:
    """A decode step through the request's DecodeBinding: the inputs written in place, one run."""
    step = cache.decode_binding
    if step is None:
        step = cache.decode_binding = DecodeBinding(session, cache, *logits_meta)
    total = int(cache.lengths.max()) + 1
    if total > cache.capacity:
        raise ValueError(f"KV cache of {cache.capacity} slots is full")
    step.ids[:] = input_ids  # (B, 1)
    step.positions[:] = position_ids  # (B, 1)
    step.seqlens[:] = cache.lengths  # total length after this step - 1
    step.total[...] = total
    session.run_with_iobinding(step.binding)
    cache.lengths = cache.lengths + 1
    return step.logits
