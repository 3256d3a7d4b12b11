//! `camelid chat`: a conversation through the model's chat template. Lines starting with `/`
//! that name a command (`/help`) steer the session; a message of several lines goes between
//! `"""` fences; when the conversation outgrows the window, its oldest turns are dropped;
//! Ctrl-C stops a reply without ending the chat.

use crate::commands::{emit, options, print_stats, read_text};
use crate::{interrupt, resolve, ModelArgs, SamplingArgs};
use anyhow::{bail, Context, Result};
use camelid_engine::generate::{generate, FinishReason};
use camelid_model::chat_template::Message;
use std::io::{BufRead, IsTerminal, Write};

const HELP: &str = concat!(
    "  /clear   forget the conversation (the system prompt stays)\n",
    "  /exit    end the chat (also /quit, or Ctrl-D)\n",
    "  /help    this list\n",
    "  \"\"\"      begins a message of several lines; a line ending in \"\"\" ends it\n",
    "Ctrl-C stops a reply; the part shown stays in the conversation.",
);

/// Opens and closes a message of several lines, as Ollama's prompt reads them.
const FENCE: &str = "\"\"\"";

/// What a line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    Empty,
    Say(&'a str),
    /// The first line of a fenced message.
    Open,
    Clear,
    Exit,
    Help,
}

fn parse(line: &str) -> Line<'_> {
    let line = line.trim_end_matches(['\n', '\r']);
    match line.trim() {
        "" => Line::Empty,
        "/clear" => Line::Clear,
        "/exit" | "/quit" => Line::Exit,
        "/help" | "/?" => Line::Help,
        t if t.starts_with(FENCE) => Line::Open,
        _ => Line::Say(line),
    }
}

/// The message between `"""` fences: `first` is the opening line (text may follow the fence),
/// `next_line` gives the lines after it (`None` at the end of input, which also closes the
/// message). The line that ends with the fence is the last; lines are joined with newlines.
fn fenced(first: &str, next_line: &mut dyn FnMut() -> Result<Option<String>>) -> Result<String> {
    let opening = first.trim_start().trim_end_matches(['\n', '\r']);
    let mut line = opening.strip_prefix(FENCE).unwrap_or(opening).to_string();
    let mut parts: Vec<String> = Vec::new();
    loop {
        let closed = line.trim_end().strip_suffix(FENCE).map(str::to_string);
        let last = closed.is_some();
        let part = closed.unwrap_or(line);
        // The fences' own lines count only when they carry text.
        if !(part.trim().is_empty() && (parts.is_empty() || last)) {
            parts.push(part);
        }
        if last {
            break;
        }
        match next_line()? {
            Some(l) => line = l.trim_end_matches(['\n', '\r']).to_string(),
            None => break,
        }
    }
    Ok(parts.join("\n"))
}

/// How the conversation was made to fit the window.
#[derive(Debug, PartialEq, Eq)]
enum Fit {
    /// The prompt's ids, after dropping this many of the oldest messages.
    Fits { prompt: Vec<u32>, dropped: usize },
    /// The newest message alone (with the first `keep` messages) needs this many tokens.
    TooLong { tokens: usize },
}

/// Drops the oldest turns after the first `keep` messages (the system prompt) until the
/// prompt leaves `reserve` of `window` tokens for the reply. A turn is a user message and the
/// replies after it, so the conversation never starts with a reply. The newest message stays.
fn fit(
    messages: &mut Vec<Message>,
    keep: usize,
    window: usize,
    reserve: usize,
    prompt_of: &mut dyn FnMut(&[Message]) -> Result<Vec<u32>>,
) -> Result<Fit> {
    let mut dropped = 0;
    loop {
        let prompt = prompt_of(messages)?;
        if prompt.len() + reserve <= window {
            return Ok(Fit::Fits { prompt, dropped });
        }
        if messages.len() <= keep + 1 {
            return Ok(Fit::TooLong {
                tokens: prompt.len(),
            });
        }
        messages.remove(keep);
        dropped += 1;
        while messages.len() > keep + 1 && messages[keep].role != "user" {
            messages.remove(keep);
            dropped += 1;
        }
    }
}

pub fn chat(
    margs: &ModelArgs,
    sargs: &SamplingArgs,
    system: Option<String>,
    context: Option<usize>,
) -> Result<()> {
    let model = resolve::load(margs)?;
    let tok = model.tokenizer()?;
    let model_window = model.spec().max_positions;
    let window = match context {
        Some(0) => bail!("--context: 0 leaves no room for a conversation"),
        Some(c) if c > model_window => bail!(
            "--context {c} is larger than {}'s context window ({model_window} tokens)",
            model.name
        ),
        Some(c) => c,
        None => model_window,
    };
    // Room kept for each reply; half the window at most, so that a long -n still leaves history.
    let reserve = sargs.max_tokens.clamp(1, (window / 2).max(1));
    let interactive = std::io::stdin().is_terminal();
    let mut messages: Vec<Message> = Vec::new();
    if let Some(s) = system {
        messages.push(Message::new("system", &s));
    }
    let keep = messages.len();
    if interactive {
        eprintln!(
            "camelid chat with {} — type a message, Enter to send, /help for commands, Ctrl-D to quit.",
            model.name
        );
        interrupt::catch();
        interrupt::arm(false);
    }
    let bos_text = tok.bos_id.and_then(|b| tok.id_to_token(b));
    let mut prompt_of = |messages: &[Message]| -> Result<Vec<u32>> {
        let text = model.chat_template.render(messages, true)?;
        let mut ids = tok.encode(&text, false)?;
        // Templates usually write the BOS text themselves; add the id only when they do not.
        if tok.add_bos && !bos_text.as_deref().is_some_and(|b| text.starts_with(b)) {
            if let Some(b) = tok.bos_id {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    };
    let base = options(sargs);
    let stdin = std::io::stdin();
    let mut lines = stdin.lock();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush().ok();
        }
        let mut buf = Vec::new();
        if lines.read_until(b'\n', &mut buf).context("reading stdin")? == 0 {
            break;
        }
        let line = read_text("stdin", buf)?;
        let text = match parse(&line) {
            Line::Empty => continue,
            Line::Open => fenced(&line, &mut || {
                if interactive {
                    eprint!("... ");
                    std::io::stderr().flush().ok();
                }
                let mut buf = Vec::new();
                match lines.read_until(b'\n', &mut buf).context("reading stdin")? {
                    0 => Ok(None),
                    _ => read_text("stdin", buf).map(Some),
                }
            })?,
            Line::Exit => break,
            Line::Help => {
                eprintln!("{HELP}");
                continue;
            }
            Line::Clear => {
                messages.truncate(keep);
                eprintln!("[the conversation is cleared]");
                continue;
            }
            Line::Say(text) => text.to_string(),
        };
        if text.trim().is_empty() {
            continue;
        }
        messages.push(Message::new("user", &text));
        let prompt = match fit(&mut messages, keep, window, reserve, &mut prompt_of)? {
            Fit::Fits { prompt, dropped } => {
                if dropped > 0 {
                    eprintln!(
                        "[the {dropped} oldest messages were dropped to fit the {window}-token window]"
                    );
                }
                prompt
            }
            Fit::TooLong { tokens } => {
                messages.pop();
                let why = format!(
                    "this message makes a prompt of {tokens} tokens; with {reserve} kept for the \
                     reply, the {window}-token window holds {}",
                    window.saturating_sub(reserve)
                );
                if !interactive {
                    bail!("{why}");
                }
                eprintln!("[{why}; it was not sent]");
                continue;
            }
        };
        let mut opts = base.clone();
        opts.max_tokens = opts.max_tokens.min(window - prompt.len());
        interrupt::take();
        interrupt::arm(interactive);
        let mut closed = false;
        let result = {
            let mut out = std::io::stdout().lock();
            generate(&model, &prompt, &opts, &mut |piece| {
                // A closed pipe (e.g. `| head`) ends the chat, Ctrl-C the reply, quietly.
                closed = out.write_all(piece.as_bytes()).is_err() || out.flush().is_err();
                !closed && !interrupt::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
            })
        };
        interrupt::arm(false);
        if closed {
            break;
        }
        emit("")?;
        let g = match result {
            Ok(g) => g,
            Err(e) if interactive => {
                messages.pop();
                eprintln!("[error: {e}]");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if g.finish == FinishReason::Cancelled && interrupt::take() {
            eprintln!("[stopped]");
        }
        if sargs.stats {
            print_stats(&g);
        }
        messages.push(Message::new("assistant", g.text.trim()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation(roles: &[&str]) -> Vec<Message> {
        roles
            .iter()
            .enumerate()
            .map(|(i, r)| Message::new(r, &format!("m{i}")))
            .collect()
    }

    /// Ten tokens per message: a stand-in for the template and tokenizer.
    fn ten_each(m: &[Message]) -> Result<Vec<u32>> {
        Ok(vec![0; 10 * m.len()])
    }

    fn contents(m: &[Message]) -> Vec<&str> {
        m.iter().map(|m| m.content.as_str()).collect()
    }

    #[test]
    fn commands_are_whole_lines_and_other_text_is_said() {
        assert_eq!(parse("/exit\n"), Line::Exit);
        assert_eq!(parse("  /quit \r\n"), Line::Exit);
        assert_eq!(parse("/clear\n"), Line::Clear);
        assert_eq!(parse("/help\n"), Line::Help);
        assert_eq!(parse(" \n"), Line::Empty);
        assert_eq!(parse("/exit now\n"), Line::Say("/exit now"));
        assert_eq!(
            parse("/etc/hosts lists names\n"),
            Line::Say("/etc/hosts lists names")
        );
        assert_eq!(parse("  indented\n"), Line::Say("  indented"));
    }

    /// `fenced` over the given lines after `first`.
    fn fence(first: &str, rest: &[&str]) -> String {
        let mut rest = rest.iter().map(|l| format!("{l}\n"));
        fenced(first, &mut || Ok(rest.next())).unwrap()
    }

    #[test]
    fn a_fenced_message_keeps_its_lines() {
        assert_eq!(parse("\"\"\"\n"), Line::Open);
        assert_eq!(parse("  \"\"\"Dear camel,\n"), Line::Open);
        assert_eq!(
            fence("\"\"\"\n", &["a", "", "  b", "\"\"\"", "after"]),
            "a\n\n  b"
        );
        assert_eq!(fence("\"\"\"first\n", &["second\"\"\""]), "first\nsecond");
        assert_eq!(fence("\"\"\"one line\"\"\"\n", &["after"]), "one line");
        // The end of input closes it.
        assert_eq!(fence("\"\"\"\n", &["a", "b"]), "a\nb");
        assert_eq!(fence("\"\"\"\n", &["\"\"\""]), "");
    }

    #[test]
    fn a_conversation_that_fits_is_kept_whole() {
        let mut m = conversation(&["system", "user", "assistant", "user"]);
        let fit = fit(&mut m, 1, 100, 20, &mut ten_each).unwrap();
        assert_eq!(
            fit,
            Fit::Fits {
                prompt: vec![0; 40],
                dropped: 0
            }
        );
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn the_oldest_turns_go_first_and_the_system_prompt_stays() {
        // system, then three turns; 60 tokens, room for 45 with 15 reserved.
        let mut m = conversation(&["system", "user", "assistant", "user", "assistant", "user"]);
        let fit = fit(&mut m, 1, 60, 15, &mut ten_each).unwrap();
        assert_eq!(
            fit,
            Fit::Fits {
                prompt: vec![0; 40],
                dropped: 2
            }
        );
        assert_eq!(contents(&m), ["m0", "m3", "m4", "m5"]);
    }

    #[test]
    fn a_turn_leaves_whole_with_all_its_replies() {
        // Tool-style turns can have several non-user messages after one user message.
        let mut m = conversation(&["user", "assistant", "tool", "assistant", "user"]);
        let fit = fit(&mut m, 0, 40, 25, &mut ten_each).unwrap();
        assert_eq!(
            fit,
            Fit::Fits {
                prompt: vec![0; 10],
                dropped: 4
            }
        );
        assert_eq!(contents(&m), ["m4"]);
    }

    #[test]
    fn a_message_too_long_alone_is_reported_with_its_size() {
        let mut m = conversation(&["system", "user", "assistant", "user"]);
        let fit = fit(&mut m, 1, 25, 10, &mut ten_each).unwrap();
        assert_eq!(fit, Fit::TooLong { tokens: 20 });
        assert_eq!(contents(&m), ["m0", "m3"]);
    }
}
