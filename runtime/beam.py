"""Beam search in numpy: a port of transformers 5.24's `GenerationMixin._beam_search` (do_sample=False).

Same state, same float32 arithmetic, same order of operations, so the chosen sequence is token-for-token the one
`generate(num_beams=N)` returns:

```
 logits (B*N, V) -> log_softmax -> processors (repetition penalty, min_new_tokens) -> + running beam scores
   -> top 2N over (N x V) per row -> hits = eos | max length
   -> running: best N that did not hit            -> KV cache rows reordered by their source beam
   -> finished: the top-N candidates that hit, scored sum_logprobs / generated_len ** length_penalty
   -> early-stop heuristic (False / True / "never")
```

Scores are accumulated log-probabilities; `-1e9` marks "not a candidate", exactly as transformers does (finished
hypotheses are kept in fixed-size (B, N) slots that start as -1e9 placeholders).
"""

import numpy as np

NEG = np.float32(-1.0e9)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 (B, V) -> (B, V)."""
    x = logits.astype(np.float32, copy=False)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries per row, best first (ties: lower index first). (B, M) -> (B, k)."""
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        part.sort(axis=1)  # lower index first among ties, after the stable sort below
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def gather(tensor: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """transformers' `_gather_beams`: tensor (B, beams, ...) at beam indices (B, k) -> (B, k, ...)."""
    idx = indices.reshape(indices.shape + (1,) * (tensor.ndim - 2))
    return np.take_along_axis(tensor, idx, axis=1)


def beam_search(logits: np.ndarray, decode, input_ids: np.ndarray, attention_mask: np.ndarray, num_beams: int,
                max_new_tokens: int, min_new_tokens: int, repetition_penalty: float, length_penalty: float,
                early_stopping, eos_token_id, pad_token_id: int) -> list:
    """Run beam search; return the best hypothesis' generated token ids per prompt (eos included if emitted).

    Args:
        logits: (B*N, V) last-position logits of the prefill, each prompt's row repeated N times.
        decode: f(tokens (B*N,), beam_idx (B*N,)) -> (B*N, V) logits: reorder the cache rows by beam_idx (new row
            i = old row beam_idx[i]), then run one decode step on `tokens`.
        input_ids, attention_mask: (B, L) left-padded prompts.
        num_beams: N >= 2.
        max_new_tokens, min_new_tokens, repetition_penalty: as transformers.
        length_penalty: finished score = sum_logprobs / generated_len ** length_penalty.
        early_stopping: False (heuristic), True or "never".
        eos_token_id: int or None.
        pad_token_id: fills unused sequence slots (never returned).
    Returns:
        list (B) of lists of token ids.
    """
    batch, prompt_len = input_ids.shape
    nb, vocab = num_beams, logits.shape[-1]
    max_length = prompt_len + max_new_tokens
    keep = max(2, 1 + (eos_token_id is not None)) * nb  # beams_to_keep
    top_num_beam_mask = np.arange(keep) < nb  # (keep,)
    fill = pad_token_id if pad_token_id else (eos_token_id if eos_token_id is not None else -1)

    running_sequences = np.full((batch, nb, max_length), fill, dtype=np.int64)
    running_sequences[:, :, :prompt_len] = input_ids[:, None, :]
    sequences = running_sequences.copy()
    running_beam_scores = np.zeros((batch, nb), dtype=np.float32)
    running_beam_scores[:, 1:] = NEG
    beam_scores = np.full((batch, nb), NEG, dtype=np.float32)
    is_sent_finished = np.zeros((batch, nb), dtype=bool)
    heuristic_unsatisfied = np.ones((batch, 1), dtype=bool)
    running_beam_indices = np.full((batch, nb, max_new_tokens), -1, dtype=np.int64)
    beam_indices = running_beam_indices.copy()
    # transformers' repetition penalty ignores each row's left padding (prompt_ignore_length)
    pad_lengths = np.repeat(np.argmax(attention_mask != 0, axis=1), nb)  # (B*N,)

    cur_len = prompt_len
    while True:
        log_probs = log_softmax(logits)  # (B*N, V)
        if repetition_penalty != 1.0:
            flat = running_sequences[:, :, :cur_len].reshape(batch * nb, cur_len)
            for row in range(batch * nb):
                ids = np.unique(flat[row, pad_lengths[row]:])
                ids = ids[ids < vocab]
                score = log_probs[row, ids]
                log_probs[row, ids] = np.where(score < 0, score * np.float32(repetition_penalty),
                                               score / np.float32(repetition_penalty))
        if eos_token_id is not None and cur_len - prompt_len < min_new_tokens:
            log_probs[:, eos_token_id] = -np.inf
        scores = (log_probs.reshape(batch, nb, vocab) + running_beam_scores[:, :, None]).reshape(batch, nb * vocab)

        # c. top-K continuations over (beams x vocab)
        topk_indices = topk(scores, keep)  # (B, K)
        topk_log_probs = np.take_along_axis(scores, topk_indices, axis=1)
        current_beam = topk_indices // vocab
        topk_ids = topk_indices % vocab
        topk_running_beam_indices = gather(running_beam_indices, current_beam)
        topk_running_sequences = gather(running_sequences, current_beam)
        topk_running_sequences[:, :, cur_len] = topk_ids
        topk_running_beam_indices[:, :, cur_len - prompt_len] = current_beam + np.arange(batch)[:, None] * nb

        # d. stopping criteria per candidate: max length, eos
        hits = np.full((batch, keep), cur_len + 1 >= max_length)
        if eos_token_id is not None:
            hits |= topk_ids == eos_token_id

        # e. the best N candidates that did not stop keep running
        topk_running_log_probs = topk_log_probs + hits.astype(np.float32) * NEG
        next_indices = topk(topk_running_log_probs, nb)
        running_sequences = gather(topk_running_sequences, next_indices)
        running_beam_scores = gather(topk_running_log_probs, next_indices)
        running_beam_indices = gather(topk_running_beam_indices, next_indices)

        # f. finished hypotheses: merge the new ones (top N candidates that stopped) into the N best so far
        just_finished = hits & top_num_beam_mask[None, :]
        finished_scores = topk_log_probs / np.float32((cur_len + 1 - prompt_len) ** length_penalty)
        full = np.all(is_sent_finished, axis=-1, keepdims=True) & (early_stopping is True)
        finished_scores = finished_scores + full.astype(np.float32) * NEG
        finished_scores = finished_scores + (~heuristic_unsatisfied).astype(np.float32) * NEG
        finished_scores = finished_scores + (~just_finished).astype(np.float32) * NEG
        merged_scores = np.concatenate([beam_scores, finished_scores], axis=1)
        best = topk(merged_scores, nb)
        sequences = gather(np.concatenate([sequences, topk_running_sequences], axis=1), best)
        beam_scores = gather(merged_scores, best)
        beam_indices = gather(np.concatenate([beam_indices, topk_running_beam_indices], axis=1), best)
        is_sent_finished = gather(np.concatenate([is_sent_finished, just_finished], axis=1), best)

        # g. cache rows follow their beams; stop when no open beam can improve
        beam_idx = running_beam_indices[:, :, cur_len - prompt_len].reshape(-1)
        cur_len += 1
        if early_stopping == "never" and length_penalty > 0.0:
            hypothetical = max_length - prompt_len
        else:
            hypothetical = cur_len - prompt_len
        best_running = running_beam_scores[:, :1] / np.float32(hypothetical ** length_penalty)
        worst_finished = np.where(is_sent_finished, beam_scores.min(axis=1, keepdims=True), NEG)
        heuristic_unsatisfied &= np.any(best_running > worst_finished, axis=-1, keepdims=True)
        open_beam = not (is_sent_finished.all() and early_stopping is True)
        if not (heuristic_unsatisfied.any() and open_beam and not hits.all()):
            break
        logits = decode(running_sequences[:, :, cur_len - 1].reshape(-1), beam_idx)

    lengths = (beam_indices[:, 0, :] != -1).sum(axis=1)  # (B,)
    return [sequences[b, 0, prompt_len:prompt_len + lengths[b]].tolist() for b in range(batch)]
