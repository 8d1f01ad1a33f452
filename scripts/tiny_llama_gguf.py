#!/usr/bin/env python3
"""Writes a tiny random-weight Llama model as GGUF, for tests that run a real
llama.cpp `llama-server` on the CPU.

Two layers, 64 wide, 4 heads, f32 weights from a fixed seed, and the
tokenizer of llama.cpp's vocab-only `ggml-vocab-llama-spm.gguf` (every
`tokenizer.*` key copied), so prompts tokenize as with a real Llama and the
server generates (meaningless) tokens quickly. About 17 MB.

Usage: tiny_llama_gguf.py --gguf-py DIR --vocab FILE --out FILE
(`scripts/llama-server.sh model DIR` calls it with the cached llama.cpp
source.)
"""

import argparse
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf-py", required=True, help="llama.cpp's gguf-py directory")
    ap.add_argument("--vocab", required=True, help="a vocab-only GGUF file")
    ap.add_argument("--out", required=True, help="the model file to write")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    sys.path.insert(0, args.gguf_py)
    import numpy as np
    import gguf

    reader = gguf.GGUFReader(args.vocab)
    arch = "llama"
    writer = gguf.GGUFWriter(args.out, arch)

    n_embd, n_layer, n_head, n_ff, n_ctx = 64, 2, 4, 128, 2048
    copied = 0
    n_vocab = None
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            value = [field.contents(i) for i in range(len(field.data))]
            writer.add_key_value(name, value, vtype, sub_type=sub)
            if name == "tokenizer.ggml.tokens":
                n_vocab = len(value)
        else:
            writer.add_key_value(name, field.contents(), vtype)
        copied += 1
    if not n_vocab:
        print(f"{args.vocab}: no tokenizer.ggml.tokens", file=sys.stderr)
        return 1

    writer.add_name("gpuscale tiny test llama")
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    rng = np.random.default_rng(args.seed)

    def weight(*shape: int) -> "np.ndarray":
        # numpy shape is (rows, cols) = GGUF (ne1, ne0): ne0 is the input width.
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def ones(n: int) -> "np.ndarray":
        return np.ones(n, dtype=np.float32)

    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", ones(n_embd))
        writer.add_tensor(p + "attn_q.weight", weight(n_embd, n_embd))
        writer.add_tensor(p + "attn_k.weight", weight(n_embd, n_embd))
        writer.add_tensor(p + "attn_v.weight", weight(n_embd, n_embd))
        writer.add_tensor(p + "attn_output.weight", weight(n_embd, n_embd))
        writer.add_tensor(p + "ffn_norm.weight", ones(n_embd))
        writer.add_tensor(p + "ffn_gate.weight", weight(n_ff, n_embd))
        writer.add_tensor(p + "ffn_up.weight", weight(n_ff, n_embd))
        writer.add_tensor(p + "ffn_down.weight", weight(n_embd, n_ff))
    writer.add_tensor("output_norm.weight", ones(n_embd))
    writer.add_tensor("output.weight", weight(n_vocab, n_embd))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {args.out}: {n_layer} layers, width {n_embd}, vocabulary {n_vocab}, "
          f"{copied} tokenizer keys copied", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
