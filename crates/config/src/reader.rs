//! A small typed walker over a span-preserving TOML tree. Every accessor
//! records a diagnostic instead of failing, so one run reports every problem.

use std::ops::Range;
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::diag::{Diagnostic, Severity, did_you_mean};

/// A value with the byte range it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sp<T> {
    pub v: T,
    pub span: Range<usize>,
}

impl<T> Sp<T> {
    pub fn new(v: T, span: Range<usize>) -> Sp<T> {
        Sp { v, span }
    }
}

/// Collected diagnostics.
#[derive(Default)]
pub struct Ctx {
    pub diags: Vec<Diagnostic>,
}

impl Ctx {
    pub fn error(&mut self, code: &'static str, span: Range<usize>, message: impl Into<String>) -> &mut Diagnostic {
        self.push(Severity::Error, code, span, message.into())
    }

    pub fn warn(&mut self, code: &'static str, span: Range<usize>, message: impl Into<String>) -> &mut Diagnostic {
        self.push(Severity::Warning, code, span, message.into())
    }

    fn push(&mut self, severity: Severity, code: &'static str, span: Range<usize>, message: String) -> &mut Diagnostic {
        self.diags.push(Diagnostic {
            severity,
            code,
            message,
            span,
            hint: None,
        });
        let last = self.diags.len() - 1;
        &mut self.diags[last]
    }

    pub fn has_errors(&self) -> bool {
        self.diags.iter().any(Diagnostic::is_error)
    }
}

/// Adds a hint to a diagnostic just recorded.
pub trait Hint {
    fn hint(&mut self, hint: impl Into<String>);
}

impl Hint for Diagnostic {
    fn hint(&mut self, hint: impl Into<String>) {
        self.hint = Some(hint.into());
    }
}

pub fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// A TOML table being read: `what` names it in messages ("resource `vip`"),
/// `span` is where to point when a required key is missing.
pub struct Obj<'t, 'i> {
    pub table: &'t DeTable<'i>,
    pub span: Range<usize>,
    pub what: String,
}

impl<'t, 'i> Obj<'t, 'i> {
    pub fn new(table: &'t DeTable<'i>, span: Range<usize>, what: impl Into<String>) -> Obj<'t, 'i> {
        Obj {
            table,
            span,
            what: what.into(),
        }
    }

    /// Reports every key not in `allowed` (E002), with a suggestion; `elsewhere`
    /// may explain where an unknown key belongs instead.
    pub fn check_keys(&self, ctx: &mut Ctx, allowed: &[&str], elsewhere: impl Fn(&str) -> Option<String>) {
        for (key, _) in self.table.iter() {
            let k: &str = key.get_ref();
            if allowed.contains(&k) {
                continue;
            }
            let d = ctx.error("E002", key.span(), format!("unknown key `{k}` in {}", self.what));
            if let Some(s) = did_you_mean(k, allowed.iter().copied()) {
                d.hint(format!("did you mean `{s}`?"));
            } else if let Some(s) = elsewhere(k) {
                d.hint(s);
            } else {
                d.hint(format!("the keys of {} are: {}", self.what, allowed.join(", ")));
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&'t Spanned<DeValue<'i>>> {
        self.table
            .iter()
            .find(|(k, _)| {
                let s: &str = k.get_ref();
                s == key
            })
            .map(|(_, v)| v)
    }

    /// The span of `key` itself (for messages about the key).
    pub fn key_span(&self, key: &str) -> Option<Range<usize>> {
        self.table
            .iter()
            .find(|(k, _)| {
                let s: &str = k.get_ref();
                s == key
            })
            .map(|(k, _)| k.span())
    }

    pub fn wrong_type(&self, ctx: &mut Ctx, key: &str, v: &Spanned<DeValue<'i>>, expected: &str, example: &str) {
        ctx.error(
            "E011",
            v.span(),
            format!(
                "`{key}` in {} must be {expected}, found {}",
                self.what,
                type_name(v.get_ref())
            ),
        )
        .hint(format!("write it like {example}"));
    }

    pub fn missing(&self, ctx: &mut Ctx, key: &str, example: &str) {
        ctx.error(
            "E007",
            self.span.clone(),
            format!("{} is missing the required setting `{key}`", self.what),
        )
        .hint(format!("add {example}"));
    }

    pub fn str(&self, ctx: &mut Ctx, key: &str, example: &str) -> Option<Sp<String>> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::String(s) => Some(Sp::new(s.to_string(), v.span())),
            _ => {
                self.wrong_type(ctx, key, v, "a string", example);
                None
            }
        }
    }

    pub fn req_str(&self, ctx: &mut Ctx, key: &str, example: &str) -> Option<Sp<String>> {
        if self.get(key).is_none() {
            self.missing(ctx, key, example);
            return None;
        }
        self.str(ctx, key, example)
    }

    pub fn bool(&self, ctx: &mut Ctx, key: &str) -> Option<Sp<bool>> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Boolean(b) => Some(Sp::new(*b, v.span())),
            _ => {
                self.wrong_type(ctx, key, v, "true or false", &format!("`{key} = true`"));
                None
            }
        }
    }

    pub fn uint(&self, ctx: &mut Ctx, key: &str, max: u64, example: &str) -> Option<Sp<u64>> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Integer(i) => match u64::from_str_radix(i.as_str(), i.radix()) {
                Ok(n) if n <= max => Some(Sp::new(n, v.span())),
                _ => {
                    ctx.error(
                        "E012",
                        v.span(),
                        format!("`{key}` in {} must be between 0 and {max}", self.what),
                    )
                    .hint(format!("write it like {example}"));
                    None
                }
            },
            _ => {
                self.wrong_type(ctx, key, v, "an integer", example);
                None
            }
        }
    }

    pub fn duration(&self, ctx: &mut Ctx, key: &str) -> Option<Sp<Duration>> {
        let v = self.get(key)?;
        let example = format!("`{key} = \"2s\"` (units: ms, s, m, h, d)");
        match v.get_ref() {
            DeValue::String(s) => match understudy_core::time::parse_duration(s) {
                Ok(d) => Some(Sp::new(d, v.span())),
                Err(e) => {
                    ctx.error(
                        "E010",
                        v.span(),
                        format!("invalid duration for `{key}` in {}: {e}", self.what),
                    )
                    .hint(format!("write it like {example}"));
                    None
                }
            },
            DeValue::Integer(_) | DeValue::Float(_) => {
                ctx.error(
                    "E010",
                    v.span(),
                    format!(
                        "invalid duration for `{key}` in {}: a bare number has no unit",
                        self.what
                    ),
                )
                .hint(format!("write it like {example}"));
                None
            }
            _ => {
                self.wrong_type(ctx, key, v, "a duration string", &example);
                None
            }
        }
    }

    pub fn str_array(&self, ctx: &mut Ctx, key: &str, example: &str) -> Option<Sp<Vec<Sp<String>>>> {
        let v = self.get(key)?;
        let DeValue::Array(items) = v.get_ref() else {
            self.wrong_type(ctx, key, v, "an array of strings", example);
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in items.iter() {
            match item.get_ref() {
                DeValue::String(s) => out.push(Sp::new(s.to_string(), item.span())),
                other => {
                    ctx.error(
                        "E011",
                        item.span(),
                        format!(
                            "`{key}` in {} must hold only strings, found {}",
                            self.what,
                            type_name(other)
                        ),
                    )
                    .hint(format!("write it like {example}"));
                    ok = false;
                }
            }
        }
        ok.then(|| Sp::new(out, v.span()))
    }

    pub fn req_str_array(&self, ctx: &mut Ctx, key: &str, example: &str) -> Option<Sp<Vec<Sp<String>>>> {
        if self.get(key).is_none() {
            self.missing(ctx, key, example);
            return None;
        }
        self.str_array(ctx, key, example)
    }

    /// A command: a non-empty array of strings.
    pub fn command(&self, ctx: &mut Ctx, key: &str, required: bool) -> Option<Vec<String>> {
        let example = format!("`{key} = [\"/usr/bin/program\", \"--flag\"]`");
        if self.get(key).is_none() {
            if required {
                self.missing(ctx, key, &example);
            }
            return None;
        }
        let arr = self.str_array(ctx, key, &example)?;
        if arr.v.is_empty() || arr.v[0].v.is_empty() {
            ctx.error(
                "E012",
                arr.span,
                format!("`{key}` in {} is an empty command", self.what),
            )
            .hint(format!("write it like {example}"));
            return None;
        }
        Some(arr.v.into_iter().map(|s| s.v).collect())
    }

    pub fn table(&self, ctx: &mut Ctx, key: &str, example: &str) -> Option<Obj<'t, 'i>> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Table(t) => Some(Obj::new(t, v.span(), format!("`{key}` of {}", self.what))),
            _ => {
                self.wrong_type(ctx, key, v, "a table", example);
                None
            }
        }
    }

    /// A string-to-string table such as `env`.
    pub fn string_map(&self, ctx: &mut Ctx, key: &str) -> Vec<(String, String)> {
        let Some(t) = self.table(ctx, key, &format!("`{key} = {{ NAME = \"value\" }}`")) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in t.table.iter() {
            match v.get_ref() {
                DeValue::String(s) => out.push((k.get_ref().to_string(), s.to_string())),
                other => {
                    ctx.error(
                        "E011",
                        v.span(),
                        format!(
                            "`{key}.{}` in {} must be a string, found {}",
                            k.get_ref(),
                            self.what,
                            type_name(other)
                        ),
                    )
                    .hint(format!("quote the value: `{} = \"…\"`", k.get_ref()));
                }
            }
        }
        out
    }

    /// One of a fixed set of strings.
    pub fn choice(&self, ctx: &mut Ctx, key: &str, choices: &[&str]) -> Option<Sp<String>> {
        let example = format!("`{key} = \"{}\"`", choices.first().copied().unwrap_or(""));
        let s = self.str(ctx, key, &example)?;
        if choices.contains(&s.v.as_str()) {
            return Some(s);
        }
        let d = ctx.error(
            "E012",
            s.span.clone(),
            format!(
                "`{key}` in {} must be one of {}, not `{}`",
                self.what,
                quoted(choices),
                s.v
            ),
        );
        if let Some(m) = did_you_mean(&s.v, choices.iter().copied()) {
            d.hint(format!("did you mean `{m}`?"));
        } else {
            d.hint(format!("write it like {example}"));
        }
        None
    }

    pub fn ipnet(&self, ctx: &mut Ctx, key: &str, example: &str) -> Option<Sp<IpNet>> {
        let s = self.str(ctx, key, example)?;
        parse_ipnet(ctx, &s, &format!("`{key}` in {}", self.what), example)
    }
}

pub fn parse_ipnet(ctx: &mut Ctx, s: &Sp<String>, what: &str, example: &str) -> Option<Sp<IpNet>> {
    match s.v.parse::<IpNet>() {
        Ok(net) => Some(Sp::new(net, s.span.clone())),
        Err(_) => {
            let d = ctx.error(
                "E012",
                s.span.clone(),
                format!("{what} is not an address with a prefix length: `{}`", s.v),
            );
            if s.v.parse::<std::net::IpAddr>().is_ok() {
                d.hint(format!("add the prefix length of the subnet, e.g. `{}/24`", s.v));
            } else {
                d.hint(format!("write it like {example}"));
            }
            None
        }
    }
}

pub fn quoted(items: &[&str]) -> String {
    items.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ")
}

/// Names end up in coordinator keys and command lines: keep them plain.
pub fn check_name(ctx: &mut Ctx, name: &Sp<String>, what: &str) -> bool {
    let ok = !name.v.is_empty()
        && name.v.len() <= 63
        && name.v.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        ctx.error("E012", name.span.clone(), format!("invalid {what} name `{}`", name.v))
            .hint("use 1 to 63 letters, digits, `-`, `_` or `.`, starting with a letter or digit");
    }
    ok
}
