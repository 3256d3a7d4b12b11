//! Constrained decoding for JSON output (OpenAI's `response_format`): a prefix checker that
//! says whether text can still be extended into one JSON value matching a schema, so the
//! scheduler only lets the model pick tokens that keep its output on track and ends it when
//! the value is complete.
//!
//! Schemas cover what structured output needs in practice: `type` object (with `properties`,
//! `required`; no other keys), array (`items`), string, number, integer, boolean, null; `enum`
//! and `const` of strings, numbers, booleans or null; `anyOf`; `{}` for any value. Runs of
//! whitespace are capped, so a model cannot stall a value forever with blanks.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Schema {
    Any,
    Object {
        properties: Vec<(String, Schema)>,
        required: Vec<String>,
    },
    /// An object with any keys and values (`{"type":"object"}` without properties).
    AnyObject,
    Array(Box<Schema>),
    String,
    Number,
    Integer,
    Boolean,
    Null,
    /// One of these JSON texts exactly.
    Enum(Vec<String>),
    AnyOf(Vec<Schema>),
}

impl Schema {
    /// Reads a JSON-schema document; unsupported keywords are an error naming them.
    pub fn from_json(v: &Value) -> Result<Schema, String> {
        let obj = match v {
            Value::Bool(true) => return Ok(Schema::Any),
            Value::Object(o) => o,
            other => return Err(format!("a schema must be an object, got {other}")),
        };
        let literals = match (obj.get("const"), obj.get("enum")) {
            (Some(c), _) => Some(vec![c.clone()]),
            (None, Some(Value::Array(a))) if !a.is_empty() => Some(a.clone()),
            (None, Some(_)) => return Err("`enum` must be a non-empty array".into()),
            (None, None) => None,
        };
        if let Some(list) = literals {
            if list.iter().any(|x| x.is_array() || x.is_object()) {
                return Err("`enum` / `const` of arrays or objects is not supported".into());
            }
            return Ok(Schema::Enum(list.iter().map(Value::to_string).collect()));
        }
        if let Some(Value::Array(options)) = obj.get("anyOf").or(obj.get("oneOf")) {
            return Ok(Schema::AnyOf(
                options
                    .iter()
                    .map(Schema::from_json)
                    .collect::<Result<_, _>>()?,
            ));
        }
        let ty = match obj.get("type") {
            None => return Ok(Schema::Any),
            Some(Value::String(t)) => t.as_str(),
            Some(Value::Array(ts)) => {
                let options = ts
                    .iter()
                    .map(|t| {
                        let mut o = obj.clone();
                        o.insert("type".into(), t.clone());
                        Schema::from_json(&Value::Object(o))
                    })
                    .collect::<Result<_, _>>()?;
                return Ok(Schema::AnyOf(options));
            }
            Some(other) => return Err(format!("`type` must be a string, got {other}")),
        };
        Ok(match ty {
            "object" => match obj.get("properties") {
                None => Schema::AnyObject,
                Some(Value::Object(props)) => {
                    let properties = props
                        .iter()
                        .map(|(k, s)| Ok((k.clone(), Schema::from_json(s)?)))
                        .collect::<Result<Vec<_>, String>>()?;
                    let required = match obj.get("required") {
                        None => Vec::new(),
                        Some(Value::Array(r)) => r
                            .iter()
                            .map(|x| {
                                x.as_str()
                                    .filter(|k| props.contains_key(*k))
                                    .map(str::to_string)
                                    .ok_or_else(|| {
                                        format!("`required` names an unknown property {x}")
                                    })
                            })
                            .collect::<Result<_, _>>()?,
                        Some(_) => return Err("`required` must be an array".into()),
                    };
                    Schema::Object {
                        properties,
                        required,
                    }
                }
                Some(_) => return Err("`properties` must be an object".into()),
            },
            "array" => Schema::Array(Box::new(match obj.get("items") {
                None => Schema::Any,
                Some(s) => Schema::from_json(s)?,
            })),
            "string" => Schema::String,
            "number" => Schema::Number,
            "integer" => Schema::Integer,
            "boolean" => Schema::Boolean,
            "null" => Schema::Null,
            other => return Err(format!("unsupported schema type `{other}`")),
        })
    }
}

/// How far text goes toward a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Cannot become a matching value.
    Invalid,
    /// A prefix of a matching value.
    Partial,
    /// One complete matching value (nothing may follow).
    Complete,
}

const MAX_WHITESPACE: usize = 8;

/// Result of parsing a value at a position: the end of a complete value, or "the input ran out
/// while the value was still viable".
type Step = Result<Option<usize>, ()>;

/// An object schema's properties and required keys.
type ObjectSchema<'a> = (&'a [(String, Schema)], &'a [String]);

struct Parser<'a> {
    s: &'a [u8],
}

impl Parser<'_> {
    fn ws(&self, mut i: usize) -> Result<usize, ()> {
        let start = i;
        while i < self.s.len() && matches!(self.s[i], b' ' | b'\n' | b'\t' | b'\r') {
            i += 1;
        }
        if i - start > MAX_WHITESPACE {
            return Err(());
        }
        Ok(i)
    }

    /// `lit` at `i`: complete, or the input is a prefix of it.
    fn literal(&self, i: usize, lit: &[u8]) -> Step {
        let rest = &self.s[i..];
        if rest.len() >= lit.len() {
            if &rest[..lit.len()] == lit {
                Ok(Some(i + lit.len()))
            } else {
                Err(())
            }
        } else if lit.starts_with(rest) {
            Ok(None)
        } else {
            Err(())
        }
    }

    fn string(&self, i: usize) -> Step {
        if i >= self.s.len() {
            return Ok(None);
        }
        if self.s[i] != b'"' {
            return Err(());
        }
        let mut j = i + 1;
        while j < self.s.len() {
            match self.s[j] {
                b'"' => return Ok(Some(j + 1)),
                b'\\' => {
                    let Some(&e) = self.s.get(j + 1) else {
                        return Ok(None);
                    };
                    match e {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => j += 2,
                        b'u' => {
                            for k in 0..4 {
                                match self.s.get(j + 2 + k) {
                                    None => return Ok(None),
                                    Some(h) if h.is_ascii_hexdigit() => {}
                                    Some(_) => return Err(()),
                                }
                            }
                            j += 6;
                        }
                        _ => return Err(()),
                    }
                }
                c if c < 0x20 => return Err(()),
                _ => j += 1,
            }
        }
        Ok(None)
    }

    fn number(&self, i: usize, integer: bool) -> Step {
        let s = self.s;
        let mut j = i;
        if j < s.len() && s[j] == b'-' {
            j += 1;
        }
        let digits = |mut j: usize| {
            let start = j;
            while j < s.len() && s[j].is_ascii_digit() {
                j += 1;
            }
            (j, j - start)
        };
        let (k, n) = digits(j);
        if k == s.len() {
            // Ran out inside the integer part (a leading zero must stay alone).
            return if n > 1 && s[j] == b'0' {
                Err(())
            } else {
                Ok(None)
            };
        }
        if n == 0 || (n > 1 && s[j] == b'0') {
            return Err(());
        }
        j = k;
        if !integer && s[j] == b'.' {
            let (k, n) = digits(j + 1);
            if k == s.len() {
                return Ok(None);
            }
            if n == 0 {
                return Err(());
            }
            j = k;
        }
        if !integer && (s[j] == b'e' || s[j] == b'E') {
            j += 1;
            if j < s.len() && (s[j] == b'+' || s[j] == b'-') {
                j += 1;
            }
            let (k, n) = digits(j);
            if k == s.len() {
                return Ok(None);
            }
            if n == 0 {
                return Err(());
            }
            j = k;
        }
        // A number only ends at a delimiter; at the very end of the text it is still open.
        Ok(Some(j))
    }

    fn value(&self, i: usize, schema: &Schema) -> Step {
        if i >= self.s.len() {
            return Ok(None);
        }
        match schema {
            Schema::Any => match self.s[i] {
                b'{' => self.object(i, None),
                b'[' => self.array(i, &Schema::Any),
                b'"' => self.string(i),
                b't' => self.literal(i, b"true"),
                b'f' => self.literal(i, b"false"),
                b'n' => self.literal(i, b"null"),
                _ => self.number(i, false),
            },
            Schema::AnyObject => self.object(i, None),
            Schema::Object {
                properties,
                required,
            } => self.object(i, Some((properties.as_slice(), required.as_slice()))),
            Schema::Array(items) => self.array(i, items),
            Schema::String => self.string(i),
            Schema::Number => self.number(i, false),
            Schema::Integer => self.number(i, true),
            Schema::Boolean => match self.literal(i, b"true") {
                Err(()) => self.literal(i, b"false"),
                ok => ok,
            },
            Schema::Null => self.literal(i, b"null"),
            Schema::Enum(options) => {
                let mut partial = false;
                for o in options {
                    match self.literal(i, o.as_bytes()) {
                        Ok(Some(end)) if !self.continues_number(o, end) => return Ok(Some(end)),
                        Ok(_) => partial = true,
                        Err(()) => {}
                    }
                }
                if partial {
                    Ok(None)
                } else {
                    Err(())
                }
            }
            Schema::AnyOf(options) => {
                // Viable if any option is still open at the end of the text; else the longest
                // complete reading.
                let mut best: Option<usize> = None;
                for o in options {
                    match self.value(i, o) {
                        Ok(None) => return Ok(None),
                        Ok(Some(end)) => best = Some(best.map_or(end, |b| b.max(end))),
                        Err(()) => {}
                    }
                }
                best.map(Some).ok_or(())
            }
        }
    }

    /// An enum number like `1` must not be followed by more digits (`12`).
    fn continues_number(&self, lit: &str, end: usize) -> bool {
        lit.bytes().last().is_some_and(|b| b.is_ascii_digit())
            && self
                .s
                .get(end)
                .is_some_and(|c| c.is_ascii_digit() || matches!(c, b'.' | b'e' | b'E'))
    }

    fn object(&self, i: usize, schema: Option<ObjectSchema>) -> Step {
        if self.s[i] != b'{' {
            return Err(());
        }
        let mut seen: Vec<&str> = Vec::new();
        let mut j = self.ws(i + 1)?;
        if j >= self.s.len() {
            return Ok(None);
        }
        if self.s[j] == b'}' {
            return match schema {
                Some((_, req)) if !req.is_empty() => Err(()),
                _ => Ok(Some(j + 1)),
            };
        }
        loop {
            // Key.
            let Some(kend) = self.string(j)? else {
                // A partial key must be the start of an allowed, unused one.
                if let Some((props, _)) = schema {
                    let partial = std::str::from_utf8(&self.s[j + 1..]).map_err(|_| ())?;
                    if !props
                        .iter()
                        .any(|(k, _)| !seen.contains(&k.as_str()) && k.starts_with(partial))
                    {
                        return Err(());
                    }
                }
                return Ok(None);
            };
            let key: String = serde_json::from_slice(&self.s[j..kend]).map_err(|_| ())?;
            let value_schema = match schema {
                Some((props, _)) => {
                    let Some((k, s)) = props.iter().find(|(k, _)| *k == key) else {
                        return Err(());
                    };
                    if seen.contains(&k.as_str()) {
                        return Err(());
                    }
                    seen.push(k.as_str());
                    s
                }
                None => &Schema::Any,
            };
            j = self.ws(kend)?;
            if j >= self.s.len() {
                return Ok(None);
            }
            if self.s[j] != b':' {
                return Err(());
            }
            j = self.ws(j + 1)?;
            let Some(vend) = self.value(j, value_schema)? else {
                return Ok(None);
            };
            j = self.ws(vend)?;
            if j >= self.s.len() {
                return Ok(None);
            }
            match self.s[j] {
                b',' => {
                    if let Some((props, _)) = schema {
                        if seen.len() == props.len() {
                            return Err(());
                        }
                    }
                    j = self.ws(j + 1)?;
                    if j >= self.s.len() {
                        return Ok(None);
                    }
                }
                b'}' => {
                    if let Some((_, req)) = schema {
                        if req.iter().any(|r| !seen.contains(&r.as_str())) {
                            return Err(());
                        }
                    }
                    return Ok(Some(j + 1));
                }
                _ => return Err(()),
            }
        }
    }

    fn array(&self, i: usize, items: &Schema) -> Step {
        if self.s[i] != b'[' {
            return Err(());
        }
        let mut j = self.ws(i + 1)?;
        if j >= self.s.len() {
            return Ok(None);
        }
        if self.s[j] == b']' {
            return Ok(Some(j + 1));
        }
        loop {
            let Some(end) = self.value(j, items)? else {
                return Ok(None);
            };
            j = self.ws(end)?;
            if j >= self.s.len() {
                return Ok(None);
            }
            match self.s[j] {
                b',' => {
                    j = self.ws(j + 1)?;
                    if j >= self.s.len() {
                        return Ok(None);
                    }
                }
                b']' => return Ok(Some(j + 1)),
                _ => return Err(()),
            }
        }
    }
}

/// Whether `text` is a prefix of, or exactly, one value matching `schema` (leading
/// whitespace is capped; a bare number at the very end counts as complete).
pub fn check(schema: &Schema, text: &str) -> Check {
    let p = Parser { s: text.as_bytes() };
    let Ok(start) = p.ws(0) else {
        return Check::Invalid;
    };
    match p.value(start, schema) {
        Err(()) => Check::Invalid,
        Ok(None) => Check::Partial,
        Ok(Some(end)) if end == text.len() => Check::Complete,
        Ok(Some(_)) => Check::Invalid,
    }
}

/// A sequence's constraint: the schema and the text produced so far.
#[derive(Debug, Clone)]
pub struct JsonConstraint {
    schema: std::sync::Arc<Schema>,
    text: String,
}

impl JsonConstraint {
    pub fn new(schema: std::sync::Arc<Schema>) -> Self {
        Self {
            schema,
            text: String::new(),
        }
    }

    /// Whether appending `piece` keeps the output viable.
    pub fn allows(&self, piece: &str) -> bool {
        if piece.is_empty() || piece.contains('\u{FFFD}') {
            return false;
        }
        let mut t = String::with_capacity(self.text.len() + piece.len());
        t.push_str(&self.text);
        t.push_str(piece);
        check(&self.schema, &t) != Check::Invalid
    }

    pub fn push(&mut self, piece: &str) {
        self.text.push_str(piece);
    }

    pub fn is_complete(&self) -> bool {
        check(&self.schema, &self.text) == Check::Complete
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn person() -> Schema {
        Schema::from_json(&json!({
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "role": {"enum": ["admin", "user"]}
            },
            "required": ["name", "age"]
        }))
        .expect("schema")
    }

    #[test]
    fn prefixes_of_matching_values_are_partial() {
        let s = person();
        let full = r#"{"name": "Ann", "age": 31, "tags": ["a", "b\n"], "role": "admin"}"#;
        for end in 1..full.len() {
            assert_eq!(check(&s, &full[..end]), Check::Partial, "{}", &full[..end]);
        }
        assert_eq!(check(&s, full), Check::Complete);
    }

    #[test]
    fn schema_violations_are_invalid() {
        let s = person();
        for bad in [
            r#"{"nam": 1"#,
            r#"{"nickname""#,
            r#"{"name": 3"#,
            r#"{"name": "A", "age": 3.5"#,
            r#"{"name": "A", "age": 01"#,
            r#"{"name": "A"}"#,
            r#"{"name": "A", "name""#,
            r#"{"name": "A", "age": 1, "role": "root""#,
            r#"{"name": "A", "age": 1}x"#,
            "hello",
            "                    {",
        ] {
            assert_eq!(check(&s, bad), Check::Invalid, "{bad}");
        }
    }

    #[test]
    fn any_of_stays_open_while_one_option_is() {
        let s = Schema::from_json(&json!({"type": "object",
            "properties": {"x": {"anyOf": [{"type": "integer"}, {"type": "number"}, {"type": "null"}]}}}))
        .expect("schema");
        assert_eq!(check(&s, r#"{"x": 1."#), Check::Partial);
        assert_eq!(check(&s, r#"{"x": 1.5}"#), Check::Complete);
        assert_eq!(check(&s, r#"{"x": nu"#), Check::Partial);
        assert_eq!(check(&s, r#"{"x": "a"#), Check::Invalid);
    }

    #[test]
    fn any_json_object_mode() {
        let s = Schema::AnyObject;
        assert_eq!(
            check(&s, r#"{"a": [1, 2.5e3, true, null, {"b": "c"}]}"#),
            Check::Complete
        );
        assert_eq!(check(&s, r#"{"a": [1, 2.5e"#), Check::Partial);
        assert_eq!(check(&s, r#"{"a": tru"#), Check::Partial);
        assert_eq!(check(&s, r#"{"a": trux"#), Check::Invalid);
        assert_eq!(check(&s, "[1]"), Check::Invalid);
        let c = JsonConstraint::new(std::sync::Arc::new(s));
        assert!(c.allows("{\""));
        assert!(!c.allows("Sure"));
    }
}
