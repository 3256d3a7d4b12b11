//! Chat templates: the model's own Jinja template (from `tokenizer_config.json` or GGUF
//! metadata) rendered with minijinja the way transformers renders it (trim/lstrip blocks,
//! Python string methods), and a plain transcript for models that ship none.

use crate::error::{ModelError, Result};
use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    /// `None`: the model has no template and [`ChatTemplate::render`] writes a transcript.
    has_template: bool,
    /// The template reads a `tools` variable (function calling).
    uses_tools: bool,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: Option<String>, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks on.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ModelError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String {
            // Deterministic output matters more for tests than the real date.
            "01 Jan 2025".to_string()
        });
        let has_template = source.is_some();
        let uses_tools = source.as_deref().is_some_and(|s| s.contains("tools"));
        if let Some(src) = source {
            env.add_template_owned("chat", src).map_err(|e| {
                ModelError::Template(format!("cannot parse the model's template: {e}"))
            })?;
        }
        Ok(Self {
            env,
            has_template,
            uses_tools,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    pub fn has_template(&self) -> bool {
        self.has_template
    }

    /// Whether the model's template renders tool definitions itself.
    pub fn uses_tools(&self) -> bool {
        self.uses_tools
    }

    /// Renders the conversation, ending with the assistant's turn opened when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// As [`Self::render`], with OpenAI-style tool definitions passed to the template as
    /// `tools` (templates that define function calling read them).
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        if !self.has_template {
            return Ok(plain_transcript(messages, add_generation_prompt));
        }
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            tools => tools.map(minijinja::value::Serde),
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(|e| ModelError::Template(format!("rendering failed: {e}")))
    }
}

/// For base models without a template: a transcript that base models continue sensibly.
fn plain_transcript(messages: &[Message], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    for m in messages {
        let role = match m.role.as_str() {
            "system" => "System",
            "user" => "User",
            "assistant" => "Assistant",
            other => other,
        };
        out.push_str(&format!("{role}: {}\n", m.content));
    }
    if add_generation_prompt {
        out.push_str("Assistant:");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_template_with_python_methods() {
        let src = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let t = ChatTemplate::new(Some(src.into()), "", "<|im_end|>").unwrap();
        let out = t.render(&[Message::new("user", "  hi  ")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_surfaces_as_error() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}";
        let t = ChatTemplate::new(Some(src.into()), "", "").unwrap();
        let err = t
            .render(&[Message::new("assistant", "x")], false)
            .unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn fallback_transcript() {
        let t = ChatTemplate::new(None, "", "").unwrap();
        let out = t
            .render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", "Hi"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(out, "System: Be brief.\nUser: Hi\nAssistant:");
    }
}
