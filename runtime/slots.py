"""The server's KV cache: a fixed number of slots, one row per running sequence, allocated once at start.

A `shared_buffer` artifact (graphs/shared_kv.py) gets `SlotCache`: per KV tensor one buffer
(slots, num_heads, context, head_size), allocated and touched at start, so the server's memory is known before the
first request. GroupQueryAttention writes each row's new K/V at slot `seqlens_k[b]` of that row, so:

```
 prefill of a new sequence into slot s:  bind rows [s, s+1) of every buffer, ids (1, L), seqlens_k = L-1
 prefill of new sequences in slots [s, e): bind rows [s, e), ids (e-s, L) right-padded, seqlens_k = L_b-1 each
 decode step of the running slots:       bind rows [lo, hi) (lowest to highest running slot), ids (hi-lo, 1)
                                          free rows inside [lo, hi) are fed a pad token at position 0 (their
                                          slot 0 is scratch until a prefill rewrites it); their logits are dropped;
                                          a busy row left out of the step (a sequence that speculates) is fed one
                                          at its length: the slot past its tokens, which its next write rewrites
 speculation of the sequence in slot s:  bind rows [s, s+1), ids (1, n), seqlens_k = length + n - 1, logits of
                                          all n positions (`extend`); `rewind` drops the rejected ones
```

Binding a range of rows of a buffer is a pointer and a shape: no KV byte is ever copied, on CPU or CUDA.
A free slot is the lowest one, so holes in [lo, hi) are filled first.

A default (`concat`) artifact gets `ConcatSlots`, the slower path: each slot keeps its own growing cache and a decode
step runs the slots one after another (the graph concatenates past and new K/V, so rows of different lengths cannot
share one run without copying every cache into a padded batch each step). Its memory is bounded by the same
figure, but grows as sequences do.
"""

import numpy as np
import onnxruntime as ort

from .session import Decoder
from .speculative import checks_drafts


def cache_bytes(decoder: Decoder, slots: int, context: int) -> int:
    """Bytes of a KV cache of `slots` rows of `context` positions for this decoder."""
    itemsize = np.dtype(decoder.kv_dtype).itemsize
    return len(decoder.pairs) * slots * decoder.num_heads * context * decoder.head_size * itemsize


class SlotCache:
    """The in-place cache of a shared_buffer artifact.

    Args:
        decoder: the artifact's Decoder (its graph has seqlens_k, total_sequence_length, logits_index).
        slots: rows (the server's --max-batch).
        context: positions per row (prompt + generated tokens at most).
    """

    preallocated = True

    def __init__(self, decoder: Decoder, slots: int, context: int):
        self.decoder, self.slots, self.context = decoder, slots, context
        self.device = "cuda" if decoder.provider == "cuda" else "cpu"
        shape = (slots, decoder.num_heads, context, decoder.head_size)  # (slots, nh, context, hs)
        self._keep, self._ptr = {}, {}
        for past, _ in decoder.pairs:
            if self.device == "cpu":
                buffer = np.empty(shape, dtype=decoder.kv_dtype)
                buffer.fill(0)  # touch every page now: an out-of-memory shows at start, not mid-request
                self._ptr[past] = buffer.ctypes.data
            else:
                buffer = ort.OrtValue.ortvalue_from_shape_and_type(shape, decoder.kv_dtype, "cuda", 0)
                self._ptr[past] = buffer.data_ptr()
            self._keep[past] = buffer
        self.row_bytes = decoder.num_heads * context * decoder.head_size * np.dtype(decoder.kv_dtype).itemsize
        self.lengths = np.zeros(slots, dtype=np.int64)  # real tokens cached per slot
        self.nbytes = cache_bytes(decoder, slots, context)

    def prefill(self, slot: int, ids: list) -> np.ndarray:
        """Write a prompt's K/V into `slot` (from position 0); returns its last position's logits (vocab,)."""
        n = len(ids)
        if n > self.context:
            raise ValueError(f"prompt of {n} tokens does not fit a slot of {self.context} positions")
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64),
                 "position_ids": np.arange(n, dtype=np.int64)[None, :],  # (1, L)
                 "seqlens_k": np.array([n - 1], dtype=np.int32),
                 "total_sequence_length": np.array(n, dtype=np.int32),
                 "logits_index": np.array([n - 1], dtype=np.int64)}
        logits = self._run(slot, 1, feeds)
        self.lengths[slot] = n
        return logits[0, -1]

    def prefill_many(self, first: int, prompts: list) -> np.ndarray:
        """Write several prompts' K/V into the consecutive slots `first`, `first + 1`, ... in one run.

        The prompts are right-padded to the longest (GroupQueryAttention takes a right-padded first prompt: each
        row's `seqlens_k` is its own length - 1, and its pad positions are rewritten by its first decode step);
        each row's logits are read at its own last position. Returns (len(prompts), vocab).
        """
        lengths = np.array([len(ids) for ids in prompts], dtype=np.int64)
        longest = int(lengths.max())
        if longest > self.context:
            raise ValueError(f"prompt of {longest} tokens does not fit a slot of {self.context} positions")
        count = len(prompts)
        ids = np.full((count, longest), self.decoder.pad_token_id, dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)] = prompt
        feeds = {"input_ids": ids,
                 "position_ids": np.broadcast_to(np.arange(longest, dtype=np.int64), ids.shape).copy(),
                 "seqlens_k": (lengths - 1).astype(np.int32),
                 "total_sequence_length": np.array(longest, dtype=np.int32),
                 "logits_index": lengths - 1}
        logits = self._run(first, count, feeds)  # (count, 1, vocab)
        self.lengths[first:first + count] = lengths
        return logits[:, -1]

    def decode(self, slots: list, tokens: list) -> np.ndarray:
        """One step of the sequences in `slots` (each fed its token); returns (len(slots), vocab) logits.

        Every slot in [min(slots), max(slots)] that is not in `slots` must be free: it gets a scratch token.
        """
        slots = np.asarray(slots, dtype=np.int64)
        lo, hi = int(slots.min()), int(slots.max()) + 1
        ids = np.full((hi - lo, 1), self.decoder.pad_token_id, dtype=np.int64)  # (rows, 1)
        positions = np.zeros((hi - lo, 1), dtype=np.int64)
        # free rows: one scratch token at slot 0; busy rows left out: at their length (past their tokens)
        seqlens = np.minimum(self.lengths[lo:hi], self.context - 1).astype(np.int32)
        index = slots - lo
        ids[index, 0] = tokens
        positions[index, 0] = self.lengths[slots]  # a token's position = real tokens before it
        seqlens[index] = self.lengths[slots]  # total length after this step - 1
        total = int(seqlens.max()) + 1
        if total > self.context:
            raise ValueError(f"KV cache slot of {self.context} positions is full")
        feeds = {"input_ids": ids, "position_ids": positions, "seqlens_k": seqlens,
                 "total_sequence_length": np.array(total, dtype=np.int32),
                 "logits_index": np.zeros(hi - lo, dtype=np.int64)}
        logits = self._run(lo, hi - lo, feeds)  # (rows, 1, vocab)
        self.lengths[slots] += 1
        return logits[index, -1]

    def release(self, slot: int) -> None:
        """Forget a slot's sequence (its rows are overwritten by the next prefill)."""
        self.lengths[slot] = 0

    @property
    def speculates(self) -> bool:
        """The graph returns several positions' logits per row (`extend`): an export from this version."""
        return checks_drafts(self.decoder)

    def extend(self, slot: int, ids: list) -> np.ndarray:
        """Feed the sequence in `slot` several tokens in one run at batch 1 (speculative decoding's check: the
        graph's GroupQueryAttention takes several new tokens after a past at batch 1 only); returns every
        position's logits (len(ids), vocab). `rewind` drops what is rejected."""
        n, length = len(ids), int(self.lengths[slot]) + len(ids)
        if length > self.context:
            raise ValueError(f"KV cache slot of {self.context} positions is full")
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64),
                 "position_ids": np.arange(length - n, length, dtype=np.int64)[None, :],  # (1, n)
                 "seqlens_k": np.array([length - 1], dtype=np.int32),
                 "total_sequence_length": np.array(length, dtype=np.int32),
                 "logits_index": np.arange(n, dtype=np.int64)}
        logits = self._run(slot, 1, feeds)  # (1, n, vocab)
        self.lengths[slot] = length
        return logits[0]

    def rewind(self, slot: int, drop: int) -> None:
        """Drop the last `drop` positions of a slot (the next write rewrites them)."""
        self.lengths[slot] -= drop

    def _run(self, first: int, count: int, feeds: dict) -> np.ndarray:
        session = self.decoder.session
        binding = session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        binding.bind_output("logits")  # host memory: (count, 1, vocab)
        shape = [count, self.decoder.num_heads, self.context, self.decoder.head_size]
        offset = first * self.row_bytes
        for past, present in self.decoder.pairs:  # rows [first, first + count): a pointer and a shape
            pointer = self._ptr[past] + offset
            binding.bind_input(past, self.device, 0, self.decoder.kv_dtype, shape, pointer)
            binding.bind_output(present, self.device, 0, self.decoder.kv_dtype, shape, pointer)
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()


class ConcatSlots:
    """The slower path for a default (concat) artifact: one growing cache per slot, decoded one after another.

    Args:
        decoder: the artifact's Decoder.
        slots, context: as `SlotCache`.
    """

    preallocated = False

    def __init__(self, decoder: Decoder, slots: int, context: int):
        self.decoder, self.slots, self.context = decoder, slots, context
        self.caches = [None] * slots
        self.lengths = np.zeros(slots, dtype=np.int64)
        self.nbytes = cache_bytes(decoder, slots, context)  # the bound, reached when every slot is full

    def prefill(self, slot: int, ids: list) -> np.ndarray:
        """As `SlotCache.prefill`."""
        n = len(ids)
        self.caches[slot] = self.decoder.new_cache(1)
        logits = self.decoder.step(np.asarray([ids], dtype=np.int64), np.ones((1, n), dtype=np.int64),
                                   np.arange(n, dtype=np.int64)[None, :], self.caches[slot],
                                   logits_to_keep=1)  # (1, 1, vocab), not (1, n, vocab)
        self.lengths[slot] = n
        return logits[0, -1]

    def decode(self, slots: list, tokens: list) -> np.ndarray:
        """As `SlotCache.decode`, one run per slot."""
        out = []
        for slot, token in zip(slots, tokens):
            n = int(self.lengths[slot])
            if n + 1 > self.context:
                raise ValueError(f"KV cache slot of {self.context} positions is full")
            logits = self.decoder.step(np.array([[token]], dtype=np.int64), np.ones((1, n + 1), dtype=np.int64),
                                       np.array([[n]], dtype=np.int64), self.caches[slot], logits_to_keep=1)
            self.lengths[slot] = n + 1
            out.append(logits[0, -1])
        return np.stack(out)

    def release(self, slot: int) -> None:
        """Drop a slot's cache."""
        self.caches[slot], self.lengths[slot] = None, 0

    speculates = True

    def extend(self, slot: int, ids: list) -> np.ndarray:
        """As `SlotCache.extend`."""
        n, length = len(ids), int(self.lengths[slot]) + len(ids)
        if length > self.context:
            raise ValueError(f"KV cache slot of {self.context} positions is full")
        logits = self.decoder.step(np.asarray([ids], dtype=np.int64), np.ones((1, length), dtype=np.int64),
                                   np.arange(length - n, length, dtype=np.int64)[None, :], self.caches[slot],
                                   logits_to_keep=n)  # (1, n, vocab)
        self.lengths[slot] = length
        return logits[0]

    def rewind(self, slot: int, drop: int) -> None:
        """As `SlotCache.rewind`: the cache is cut."""
        if drop:
            self.lengths[slot] -= drop
            self.caches[slot].truncate(int(self.lengths[slot]))


def make_slots(decoder: Decoder, slots: int, context: int):
    """The cache for this decoder's graph: `SlotCache` (in place) for shared_buffer, else `ConcatSlots`."""
    return (SlotCache if decoder.shared else ConcatSlots)(decoder, slots, context)
