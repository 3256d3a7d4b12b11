"""Writes a TinyLlama-shaped LLaMA GGUF with random weights (F16; norms F32) for speed tests.

Shape: 22 layers, hidden 2048, 32 heads, 4 KV heads, FFN 5632, vocabulary 32000. The tokenizer
metadata is copied from llama.cpp's `models/ggml-vocab-llama-spm.gguf` (LLaMA's 32000-token SPM
vocabulary). Weights are N(0, 0.02), seeded, so the file is reproducible. Quantize with
llama.cpp's `llama-quantize OUT.gguf OUT-Q4_0.gguf Q4_0`.

    PYTHONPATH=$LLAMA_CPP/gguf-py python scripts/bench/make_tinyllama_random.py $LLAMA_CPP OUT.gguf
"""

import sys

import gguf
import numpy as np

llama_cpp, out = sys.argv[1], sys.argv[2]
L, H, NH, NKV, F, V = 22, 2048, 32, 4, 5632, 32000
HD = H // NH

vocab = gguf.GGUFReader(f"{llama_cpp}/models/ggml-vocab-llama-spm.gguf")
w = gguf.GGUFWriter(out, "llama")
w.add_name("tinyllama-shape-random")
w.add_context_length(2048)
w.add_embedding_length(H)
w.add_block_count(L)
w.add_feed_forward_length(F)
w.add_head_count(NH)
w.add_head_count_kv(NKV)
w.add_rope_dimension_count(HD)
w.add_rope_freq_base(10000.0)
w.add_layer_norm_rms_eps(1e-5)
w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

for field in vocab.fields.values():
    if not field.name.startswith("tokenizer."):
        continue
    t = field.types[0]
    if t == gguf.GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == gguf.GGUFValueType.STRING:
            val = [bytes(field.parts[i]).decode("utf-8", errors="surrogateescape") for i in field.data]
        else:
            val = [field.parts[i].tolist()[0] for i in field.data]
        w.add_array(field.name, val)
    elif t == gguf.GGUFValueType.STRING:
        w.add_string(field.name, bytes(field.parts[field.data[0]]).decode("utf-8"))
    else:
        w.add_key_value(field.name, field.parts[field.data[0]].tolist()[0], t)

rng = np.random.default_rng(0)


def mat(rows, cols):
    return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)


w.add_tensor("token_embd.weight", mat(V, H))
for i in range(L):
    p = f"blk.{i}"
    w.add_tensor(f"{p}.attn_norm.weight", np.ones(H, dtype=np.float32))
    w.add_tensor(f"{p}.attn_q.weight", mat(H, H))
    w.add_tensor(f"{p}.attn_k.weight", mat(NKV * HD, H))
    w.add_tensor(f"{p}.attn_v.weight", mat(NKV * HD, H))
    w.add_tensor(f"{p}.attn_output.weight", mat(H, H))
    w.add_tensor(f"{p}.ffn_norm.weight", np.ones(H, dtype=np.float32))
    w.add_tensor(f"{p}.ffn_gate.weight", mat(F, H))
    w.add_tensor(f"{p}.ffn_up.weight", mat(F, H))
    w.add_tensor(f"{p}.ffn_down.weight", mat(H, F))
w.add_tensor("output_norm.weight", np.ones(H, dtype=np.float32))
w.add_tensor("output.weight", mat(V, H))

w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
