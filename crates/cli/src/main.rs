//! The `camelid` command line. It parses arguments, resolves `-m` to a model on disk (pulling
//! catalog models on first use) and hands off to the engine; it holds no model logic itself.

mod beams;
mod chat;
mod commands;
mod device;
mod interrupt;
mod quant;
mod resolve;
mod serve;
mod train;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "camelid",
    version,
    about = "Run, chat with and benchmark open large language models",
    long_about = "camelid loads Hugging Face model directories and GGUF files of the open LLM \
families, tokenizes, generates, chats and benchmarks.\n\nWith no -m, the default model \
(smollm2-135m-instruct) is used and downloaded on first use into $CAMELID_HOME \
(default: ~/.cache/camelid)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model: a catalog name (see `camelid list`), an HF model directory, or a .gguf file
    #[arg(short, long, value_name = "MODEL")]
    pub model: Option<String>,
    /// Compute device: cpu, cuda, cuda:N or auto (a GPU when this binary has CUDA and one is
    /// present, else the CPU)
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: String,
    /// Type of the float weights on the device: f32, f16 or bf16 (default: f32 on the CPU,
    /// bf16 on a GPU; quantized GGUF files compute in f32)
    #[arg(long, value_name = "TYPE")]
    pub dtype: Option<String>,
    /// CPU threads (default: all cores)
    #[arg(short, long, value_name = "N")]
    pub threads: Option<usize>,
}

#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Maximum number of tokens to generate
    #[arg(short = 'n', long, default_value_t = 256, value_name = "N")]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy
    #[arg(
        long,
        allow_negative_numbers = true,
        default_value_t = 0.8,
        value_name = "T"
    )]
    pub temperature: f32,
    /// Keep only the K most likely tokens (0: off)
    #[arg(long, default_value_t = 40, value_name = "K")]
    pub top_k: usize,
    /// Nucleus sampling: keep the most likely tokens up to this total probability (1: off)
    #[arg(long, default_value_t = 0.95, value_name = "P")]
    pub top_p: f32,
    /// Drop tokens less likely than P times the most likely one (0: off)
    #[arg(long, default_value_t = 0.05, value_name = "P")]
    pub min_p: f32,
    /// Penalty for tokens among the last 64 (1: off)
    #[arg(long, default_value_t = 1.0, value_name = "X")]
    pub repeat_penalty: f32,
    /// Subtracted once from any token already generated
    #[arg(
        long,
        allow_negative_numbers = true,
        default_value_t = 0.0,
        value_name = "X"
    )]
    pub presence_penalty: f32,
    /// Subtracted per occurrence of a token already generated
    #[arg(
        long,
        allow_negative_numbers = true,
        default_value_t = 0.0,
        value_name = "X"
    )]
    pub frequency_penalty: f32,
    /// Random seed: the same seed gives the same text
    #[arg(long, default_value_t = 42, value_name = "N")]
    pub seed: u64,
    /// Stop before this text (repeatable)
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Keep generating past the model's end-of-sequence token
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print prompt and generation speed to stderr at the end
    #[arg(long)]
    pub stats: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Complete a prompt, streaming the continuation to stdout
    Run {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[command(flatten)]
        beam: beams::BeamArgs,
        /// Read the prompt from this file
        #[arg(short, long, value_name = "FILE", conflicts_with = "prompt")]
        file: Option<PathBuf>,
        /// The prompt (read from stdin when neither it nor --file is given)
        prompt: Option<String>,
    },
    /// Chat with the model using its chat template (one user turn per line when piped)
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// System prompt
        #[arg(long, value_name = "TEXT")]
        system: Option<String>,
        /// Tokens of conversation kept (default: the model's context window); the oldest turns
        /// are dropped to leave room for each reply
        #[arg(short, long, value_name = "N")]
        context: Option<usize>,
    },
    /// Print logits for token ids as JSON: {"ids":[...],"logits":[[...],...]}
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated token ids (the encoder input for encoder-decoder models)
        #[arg(long, value_name = "IDS", required = true)]
        ids: String,
        /// Encoder-decoder models: comma-separated decoder ids; logits for each of them
        #[arg(long, value_name = "IDS")]
        decoder_ids: Option<String>,
    },
    /// Print token ids for text as JSON {"ids":[...]}, or decode ids with --decode
    Tokenize {
        #[command(flatten)]
        model: ModelArgs,
        /// Add the model's special tokens (BOS) as generation would
        #[arg(long)]
        add_special: bool,
        /// Comma-separated ids to turn back into text
        #[arg(long, value_name = "IDS", conflicts_with = "text")]
        decode: Option<String>,
        /// Text to tokenize (stdin when not given)
        text: Option<String>,
    },
    /// Print sentence embeddings as JSON: {"embeddings":[[...],...]} (one per text)
    Embed {
        #[command(flatten)]
        model: ModelArgs,
        /// Texts to embed (one per line from stdin when none are given)
        texts: Vec<String>,
    },
    /// Download a catalog model into the cache
    Pull {
        /// Catalog name (see `camelid list`)
        name: String,
    },
    /// List catalog models and whether they are downloaded
    List,
    /// List architecture presets (the surveys' designs) with their computed sizes
    Presets,
    /// Measure prompt processing and generation speed (llama-bench style)
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt tokens processed in one pass
        #[arg(short = 'p', long, default_value_t = 512, value_name = "N")]
        prompt_tokens: usize,
        /// Tokens generated one at a time
        #[arg(short = 'n', long, default_value_t = 128, value_name = "N")]
        gen_tokens: usize,
        /// Repetitions per test
        #[arg(short = 'r', long, default_value_t = 3, value_name = "N")]
        reps: usize,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Pretrain a model (preset + overrides, or --init DIR) on token data
    Train(Box<train::TrainArgs>),
    /// Train tokenizers
    #[command(subcommand)]
    Tokenizer(train::TokenizerCommand),
    /// Prepare token data
    #[command(subcommand)]
    Data(train::DataCommand),
    /// Serve the model over an OpenAI-compatible HTTP API (continuous batching)
    Serve(serve::ServeArgs),
    /// Write a model (HF directory or GGUF) as a GGUF file with its weights in one type
    Quantize {
        /// Model: a catalog name, an HF model directory, or a .gguf file
        #[arg(short, long, value_name = "MODEL")]
        model: Option<String>,
        /// Weight type: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, F16, BF16, F32, or a
        /// llama.cpp mixed type: Q4_K_M, Q5_K_M, Q4_K_S, Q5_K_S
        #[arg(long, value_name = "TYPE")]
        to: String,
        /// Output .gguf file (written atomically)
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// Keep the output head (output.weight, or the tied embeddings) in F16
        #[arg(long)]
        keep_output: bool,
        /// Keep the token embeddings in F16
        #[arg(long)]
        keep_embeddings: bool,
    },
    /// Perplexity of the model on a text file (llama-perplexity's method, or a sliding window)
    Perplexity {
        #[command(flatten)]
        model: ModelArgs,
        /// Text file to score
        #[arg(short, long, value_name = "FILE")]
        file: PathBuf,
        /// Tokens per window (chunk)
        #[arg(long, default_value_t = 512, value_name = "N")]
        ctx: usize,
        /// Sliding-window mode (transformers' guide) advancing by S tokens; without it, the text
        /// is cut into chunks of --ctx tokens scored on their second half, as llama-perplexity does
        #[arg(long, value_name = "S")]
        stride: Option<usize>,
        /// Score only the first N chunks (windows)
        #[arg(long, value_name = "N")]
        chunks: Option<usize>,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            model,
            sampling,
            beam,
            file,
            prompt,
        } => commands::run(&model, &sampling, &beam, file.as_deref(), prompt),
        Command::Chat {
            model,
            sampling,
            system,
            context,
        } => chat::chat(&model, &sampling, system, context),
        Command::Logits {
            model,
            ids,
            decoder_ids,
        } => commands::logits(&model, &ids, decoder_ids.as_deref()),
        Command::Tokenize {
            model,
            add_special,
            decode,
            text,
        } => commands::tokenize(&model, add_special, decode.as_deref(), text),
        Command::Embed { model, texts } => commands::embed(&model, texts),
        Command::Pull { name } => commands::pull(&name),
        Command::List => commands::list(),
        Command::Presets => commands::presets(),
        Command::Bench {
            model,
            prompt_tokens,
            gen_tokens,
            reps,
            json,
        } => commands::bench(&model, prompt_tokens, gen_tokens, reps, json),
        Command::Train(args) => train::train(*args),
        Command::Tokenizer(cmd) => train::tokenizer(cmd),
        Command::Data(cmd) => train::data(cmd),
        Command::Serve(args) => serve::serve(&args),
        Command::Quantize {
            model,
            to,
            output,
            keep_output,
            keep_embeddings,
        } => quant::quantize(model.as_deref(), &to, &output, keep_output, keep_embeddings),
        Command::Perplexity {
            model,
            file,
            ctx,
            stride,
            chunks,
            json,
        } => quant::perplexity(&model, &file, ctx, stride, chunks, json),
    };
    if let Err(e) = result {
        // One line: every layer's message joined, no backtrace.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
