//! Function calling: `tools` / `tool_choice` in, `tool_calls` out.
//!
//! Tool definitions reach the model through its chat template when the template renders
//! `tools`; otherwise they are described in the system prompt in the Hermes / Qwen2.5 style
//! (`<tools>` JSON, answers as `<tool_call>{"name": .., "arguments": ..}</tool_call>`), the
//! convention SmolLM2 and Qwen2.5 were tuned on. `tool_choice: "required"` or a named function
//! constrains decoding to one call whose arguments match the function's parameter schema, so
//! the call always parses; with `"auto"` the model decides, and `<tool_call>` blocks in its
//! answer become `tool_calls`.

use crate::error::{ApiError, ApiResult};
use crate::request::Body;
use camelid_engine::json_constraint::Schema;
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    Auto,
    Required,
    Named(String),
}

#[derive(Debug, Clone)]
pub struct Tools {
    /// The request's tool objects, as given.
    pub defs: Vec<Value>,
    pub names: Vec<String>,
    pub choice: ToolChoice,
}

fn bad(m: impl Into<String>, param: &str) -> ApiError {
    ApiError::invalid(m, Some(param))
}

/// `None` when the request has no tools or `tool_choice` is `"none"`.
pub fn parse(b: &Body) -> ApiResult<Option<Tools>> {
    let defs: Vec<Value> = b.get("tools", "an array of tools")?.unwrap_or_default();
    let mut names = Vec::new();
    for (i, t) in defs.iter().enumerate() {
        let name = t
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad(format!("`tools[{i}].function.name` is required"), "tools"))?;
        if t.get("type")
            .and_then(Value::as_str)
            .is_some_and(|ty| ty != "function")
        {
            return Err(bad(format!("`tools[{i}].type` must be function"), "tools"));
        }
        names.push(name.to_string());
    }
    let choice = match b.raw("tool_choice") {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok(None),
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(
                    format!(
                        "`tool_choice` must be none, auto, required or a function, got `{other}`"
                    ),
                    "tool_choice",
                ))
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| bad("`tool_choice.function.name` is required", "tool_choice"))?;
            if !names.iter().any(|n| n == name) {
                return Err(bad(
                    format!("`tool_choice` names `{name}`, which is not among `tools`"),
                    "tool_choice",
                ));
            }
            ToolChoice::Named(name.to_string())
        }
    };
    if defs.is_empty() {
        return match choice {
            ToolChoice::Auto => Ok(None),
            _ => Err(bad("`tool_choice` needs `tools`", "tool_choice")),
        };
    }
    Ok(Some(Tools {
        defs,
        names,
        choice,
    }))
}

impl Tools {
    fn functions(&self) -> Vec<&Value> {
        self.defs.iter().filter_map(|t| t.get("function")).collect()
    }

    /// The tool description for templates that do not render `tools` themselves.
    pub fn system_block(&self) -> String {
        let list: Vec<String> = self.functions().iter().map(|f| f.to_string()).collect();
        format!(
            "You may call one or more functions to assist with the user query. The available \
             functions are listed within <tools></tools> XML tags:\n<tools>\n{}\n</tools>\n\n\
             For each function call, return a JSON object with the function name and arguments \
             within <tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \
             \"arguments\": <args-json-object>}}\n</tool_call>",
            list.join("\n")
        )
    }

    /// The output schema when a call is required: `{"name": .., "arguments": {..}}` for one of
    /// the allowed functions.
    pub fn required_schema(&self) -> ApiResult<Option<Schema>> {
        let allowed: Vec<&Value> = match &self.choice {
            ToolChoice::Auto => return Ok(None),
            ToolChoice::Required => self.functions(),
            ToolChoice::Named(n) => self
                .functions()
                .into_iter()
                .filter(|f| f.get("name").and_then(Value::as_str) == Some(n))
                .collect(),
        };
        let mut options = Vec::new();
        for f in allowed {
            let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
            let params = match f.get("parameters") {
                Some(p) => Schema::from_json(p)
                    .map_err(|e| bad(format!("function `{name}` parameters: {e}"), "tools"))?,
                None => Schema::AnyObject,
            };
            options.push(Schema::Object {
                properties: vec![
                    ("name".into(), Schema::Enum(vec![json!(name).to_string()])),
                    ("arguments".into(), params),
                ],
                required: vec!["name".into(), "arguments".into()],
            });
        }
        Ok(Some(if options.len() == 1 {
            options.remove(0)
        } else {
            Schema::AnyOf(options)
        }))
    }
}

/// One call as OpenAI returns it.
fn call(index: usize, name: &str, arguments: &Value, id: &str) -> Value {
    json!({
        "id": format!("call_{id}_{index}"),
        "type": "function",
        "function": {"name": name, "arguments": arguments.to_string()},
    })
}

/// Splits a reply into text and tool calls: the whole reply when decoding was constrained to
/// one call, else every `<tool_call>` block naming a known function. `None` when there is no
/// call.
pub fn extract(tools: &Tools, text: &str, id: &str) -> Option<(Option<String>, Vec<Value>)> {
    let parse = |s: &str| -> Option<(String, Value)> {
        let v: Value = serde_json::from_str(s.trim()).ok()?;
        let name = v.get("name")?.as_str()?.to_string();
        if !tools.names.contains(&name) {
            return None;
        }
        Some((name, v.get("arguments").cloned().unwrap_or(json!({}))))
    };
    if tools.choice != ToolChoice::Auto {
        let (name, args) = parse(text)?;
        return Some((None, vec![call(0, &name, &args, id)]));
    }
    let mut calls = Vec::new();
    let mut rest = text;
    let content = text
        .split("<tool_call>")
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    while let Some(start) = rest.find("<tool_call>") {
        let after = &rest[start + "<tool_call>".len()..];
        let end = after.find("</tool_call>").unwrap_or(after.len());
        if let Some((name, args)) = parse(&after[..end]) {
            calls.push(call(calls.len(), &name, &args, id));
        }
        rest = &after[end..];
    }
    if calls.is_empty() {
        return None;
    }
    Some(((!content.is_empty()).then_some(content), calls))
}

/// An assistant turn's earlier `tool_calls`, written back as the `<tool_call>` text the model
/// produced them from.
pub fn history_text(calls: &[Value]) -> String {
    calls
        .iter()
        .filter_map(|c| {
            let f = c.get("function")?;
            let name = f.get("name")?.as_str()?;
            let args = match f.get("arguments") {
                Some(Value::String(s)) => serde_json::from_str(s).unwrap_or(json!(s)),
                Some(v) => v.clone(),
                None => json!({}),
            };
            Some(format!(
                "<tool_call>\n{}\n</tool_call>",
                json!({"name": name, "arguments": args})
            ))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(choice: ToolChoice) -> Tools {
        Tools {
            defs: vec![
                json!({"type": "function", "function": {"name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}}}),
            ],
            names: vec!["get_weather".into()],
            choice,
        }
    }

    #[test]
    fn auto_replies_yield_their_tool_call_blocks() {
        let t = tools(ToolChoice::Auto);
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
        let (content, calls) = extract(&t, text, "x").expect("a call");
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        assert_eq!(calls[0]["function"]["arguments"], "{\"city\":\"Oslo\"}");
        assert!(extract(&t, "No tools needed.", "x").is_none());
        // Unknown functions are not calls.
        assert!(extract(
            &t,
            "<tool_call>{\"name\": \"rm\", \"arguments\": {}}</tool_call>",
            "x"
        )
        .is_none());
    }

    #[test]
    fn required_calls_follow_the_parameter_schema() {
        let t = tools(ToolChoice::Named("get_weather".into()));
        let s = t.required_schema().expect("schema").expect("constrained");
        use camelid_engine::json_constraint::{check, Check};
        assert_eq!(
            check(
                &s,
                r#"{"name": "get_weather", "arguments": {"city": "Oslo"}}"#
            ),
            Check::Complete
        );
        assert_eq!(check(&s, r#"{"name": "get_time""#), Check::Invalid);
        assert_eq!(
            check(&s, r#"{"name": "get_weather", "arguments": {}}"#),
            Check::Invalid
        );
    }
}
