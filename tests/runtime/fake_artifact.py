"""A tiny artifact built without the exporter: a byte-level tokenizer and a table-lookup decoder graph.

The graph follows docs/ARTIFACT.md's I/O exactly but its "model" is a lookup: the logits for a position are row
`input_ids` of a fixed (vocab, vocab) table, so greedy decoding walks `next_map` (token -> next token) and the
output is known in advance. Presents are Concat(past, input ids broadcast to (B, nh, S, hs)), so the cache grows
like a real one and a wrong feed shows up as a shape error.

Token ids: 0..255 are the bytes (id == byte value), 256 is <|endoftext|> (bos = eos = pad).
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from gptexport.runtime.manifest import write_manifest

EOS = 256
# The greedy chain of the tests' default artifact: after "a" it writes é, 你, an emoji, "!" and stops (eos).
CONTINUATION = "é你😀!"
VOCAB = 257
NUM_LAYERS, NUM_HEADS, HEAD_SIZE = 2, 2, 4
_ONNX_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


def byte_ids(text: str) -> list:
    """Token ids of `text` for this tokenizer (one per UTF-8 byte)."""
    return list(text.encode("utf-8"))


def chain(prompt_last: str, continuation: str, end_with_eos: bool = True) -> dict:
    """A next_map that, after the byte `prompt_last`, generates `continuation` (then eos)."""
    ids = byte_ids(prompt_last)[-1:] + byte_ids(continuation) + ([EOS] if end_with_eos else [])
    return dict(zip(ids[:-1], ids[1:]))


def _bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def make_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: one token per byte, id == byte value, plus <|endoftext|>."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab["<|endoftext|>"] = EOS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def make_table(next_map: dict = None, noise: float = 0.5, seed: int = 0) -> np.ndarray:
    """(vocab, vocab) logits: row t has a clear maximum at next_map.get(t, (t + 1) % 256) plus small noise."""
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((VOCAB, VOCAB)) * noise).astype(np.float32)
    table[:, EOS] -= 5.0  # eos only where the map asks for it
    for t in range(VOCAB):
        target = (next_map or {}).get(t, (t + 1) % 256)
        table[t, target] = 10.0
    return table


def make_graph(table: np.ndarray, kv_dtype: str = "float32", num_layers: int = NUM_LAYERS) -> onnx.ModelProto:
    """The decoder graph with the contract's inputs and outputs."""
    kv = _ONNX_DTYPE[kv_dtype]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB])]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["logits"], axis=0),  # (B, S, V)
        helper.make_node("Cast", ["input_ids"], ["ids_kv"], to=kv),
        helper.make_node("Unsqueeze", ["ids_kv", "axes"], ["ids_4d"]),  # (B, 1, S, 1)
        helper.make_node("Expand", ["ids_4d", "kv_shape"], ["proj"]),  # (B, nh, S, hs)
    ]
    for i in range(num_layers):
        for kind in ("key", "value"):
            past, present = f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"
            shape_in = ["batch", NUM_HEADS, "past_sequence", HEAD_SIZE]
            shape_out = ["batch", NUM_HEADS, "total_sequence", HEAD_SIZE]
            inputs.append(helper.make_tensor_value_info(past, kv, shape_in))
            outputs.append(helper.make_tensor_value_info(present, kv, shape_out))
            nodes.append(helper.make_node("Concat", [past, "proj"], [present], axis=2,
                                          name=f"/model/layers.{i}/attn/{kind}/Concat"))
    inits = [numpy_helper.from_array(table, "table"),
             numpy_helper.from_array(np.array([1, 3], dtype=np.int64), "axes"),
             numpy_helper.from_array(np.array([1, NUM_HEADS, 1, HEAD_SIZE], dtype=np.int64), "kv_shape")]
    graph = helper.make_graph(nodes, "fake_decoder", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model


def manifest_body(kv_dtype: str = "float32", num_layers: int = NUM_LAYERS, max_positions: int = 64) -> dict:
    """A complete manifest (without "files") for the fake model."""
    names = [f"{i}.{k}" for i in range(num_layers) for k in ("key", "value")]
    kv_shape = ["batch", NUM_HEADS, "past_sequence", HEAD_SIZE]
    return {
        "format_version": 1,
        "producer": {"name": "gptexport-tests", "version": "0.0.0"},
        "model": {"name": "fake", "architecture": "gpt2", "source": "test", "random_weights": True, "seed": 0},
        "config": {"num_layers": num_layers, "num_heads": NUM_HEADS, "head_size": HEAD_SIZE,
                   "hidden_size": NUM_HEADS * HEAD_SIZE, "vocab_size": VOCAB, "max_positions": max_positions,
                   "rotary_dim": None},
        "dtype": "float32",
        "kv_dtype": kv_dtype,
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
                   {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_sequence"]},
                   {"name": "position_ids", "dtype": "int64", "shape": ["batch", "sequence"]}]
        + [{"name": f"past_key_values.{n}", "dtype": kv_dtype, "shape": kv_shape} for n in names],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", VOCAB]}]
        + [{"name": f"present.{n}", "dtype": kv_dtype, "shape": kv_shape} for n in names],
        "special_tokens": {"bos_token_id": EOS, "eos_token_id": EOS, "pad_token_id": EOS},
        "generation": {"max_new_tokens": 8, "do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                       "repetition_penalty": 1.0},
        "passes": {"fused": False, "counts": {}},
        "validation": {"passed": True, "logits_max_abs_diff": 0.0, "tolerance": 1e-4, "greedy_agreement": 1.0},
    }


def build(directory, next_map: dict = None, kv_dtype: str = "float32", max_positions: int = 64,
          noise: float = 0.5) -> dict:
    """Write a complete fake artifact into `directory` and return its manifest."""
    from pathlib import Path
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(make_graph(make_table(next_map, noise), kv_dtype), str(directory / "model.onnx"))
    make_tokenizer().save(str(directory / "tokenizer.json"))
    return write_manifest(directory, manifest_body(kv_dtype, max_positions=max_positions))
