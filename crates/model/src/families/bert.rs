//! BERT (and sentence-transformers encoders such as all-MiniLM-L6-v2): an encoder-only,
//! bidirectional, post-LayerNorm transformer with learned positions and token-type embeddings,
//! used here for sentence embeddings (no vocabulary head).

use super::{activation, Family};
use crate::spec::{ArchSpec, MlpSpec, NormPlacement, NormSpec, Positions};

pub static BERT: Family = Family {
    name: "bert",
    title: "BERT (sentence-transformers encoders)",
    checkpoints: "`bert-base-uncased`, `sentence-transformers/all-MiniLM-L6-v2`",
    model_types: &["bert"],
    gguf_archs: &[],
    from_config: |cfg| {
        let mut s = ArchSpec::llama_like("bert");
        s.vocab_size = cfg.usize("vocab_size")?;
        s.hidden = cfg.usize("hidden_size")?;
        s.layers = cfg.usize("num_hidden_layers")?;
        s.max_positions = cfg.usize("max_position_embeddings")?;
        if let Some(kind) = cfg.opt_str("position_embedding_type")? {
            if kind != "absolute" {
                return Err(cfg.err(format!(
                    "position_embedding_type \"{kind}\" is not supported (absolute is)"
                )));
            }
        }
        s.norm = NormSpec::layer(cfg.f64_or("layer_norm_eps", 1e-12)?);
        s.norm_placement = NormPlacement::Post;
        s.positions = Positions::Learned { offset: 0 };
        s.embed_norm = true;
        s.causal = false;
        s.type_vocab_size = cfg.opt_usize("type_vocab_size")?.unwrap_or(2);
        s.final_norm = false;
        s.lm_head = false;
        let heads = cfg.usize("num_attention_heads")?;
        s.set_heads(heads, heads).map_err(|m| cfg.err(m))?;
        let a = &mut s.attention;
        a.qkv_bias = true;
        a.out_bias = true;
        s.mlp = MlpSpec::new(cfg.usize("intermediate_size")?, activation(cfg, "hidden_act", "gelu")?, true);
        Ok(s)
    },
    from_gguf: None,
    hf_tensor_names: &[
        ("token_embd", "embeddings.word_embeddings|bert.embeddings.word_embeddings"),
        (
            "position_embd",
            "embeddings.position_embeddings|bert.embeddings.position_embeddings",
        ),
        (
            "token_types",
            "embeddings.token_type_embeddings|bert.embeddings.token_type_embeddings",
        ),
        ("token_embd_norm", "embeddings.LayerNorm|bert.embeddings.LayerNorm"),
        (
            "blk.{i}.attn_q",
            "encoder.layer.{i}.attention.self.query|bert.encoder.layer.{i}.attention.self.query",
        ),
        (
            "blk.{i}.attn_k",
            "encoder.layer.{i}.attention.self.key|bert.encoder.layer.{i}.attention.self.key",
        ),
        (
            "blk.{i}.attn_v",
            "encoder.layer.{i}.attention.self.value|bert.encoder.layer.{i}.attention.self.value",
        ),
        (
            "blk.{i}.attn_output",
            "encoder.layer.{i}.attention.output.dense|bert.encoder.layer.{i}.attention.output.dense",
        ),
        (
            "blk.{i}.attn_norm",
            "encoder.layer.{i}.attention.output.LayerNorm|bert.encoder.layer.{i}.attention.output.LayerNorm",
        ),
        (
            "blk.{i}.ffn_up",
            "encoder.layer.{i}.intermediate.dense|bert.encoder.layer.{i}.intermediate.dense",
        ),
        (
            "blk.{i}.ffn_down",
            "encoder.layer.{i}.output.dense|bert.encoder.layer.{i}.output.dense",
        ),
        (
            "blk.{i}.ffn_norm",
            "encoder.layer.{i}.output.LayerNorm|bert.encoder.layer.{i}.output.LayerNorm",
        ),
    ],
    hf_transposed: &[],
};
